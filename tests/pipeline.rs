//! The pipeline end to end on the embedded Kafka-protocol cluster (librdkafka's mock
//! cluster, spoken to over TCP) with RocksDB on disk.

mod common;

use common::{TestPipeline, header, number, text, vehicle_topology};
use rdkafka::Message;
use twinflow::demo::embedded::EmbeddedKafka;
use twinflow::twin::{Status, Value};

fn cluster() -> (EmbeddedKafka, TestPipeline) {
    common::on_embedded(vehicle_topology())
}

fn prop(t: &twinflow::twin::Twin, p: &TestPipeline, name: &str) -> Option<f64> {
    t.value(p.topology.model.property(name).unwrap())
        .and_then(Value::as_f64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_become_twins_and_edge_triggered_alerts() {
    let (_kafka, mut p) = cluster();
    p.start();
    let t0 = 1_790_000_000_000;
    p.send(
        "reefer-1",
        t0,
        &[
            ("lat", 52.1),
            ("lng", 4.3),
            ("speed_kmh", 60.0),
            ("temperature_c", 4.0),
            ("battery_pct", 80.0),
        ],
    )
    .await;
    p.send("reefer-1", t0 + 1000, &[("temperature_c", 9.5)])
        .await; // breach: RAISED
    p.send(
        "reefer-1",
        t0 + 2000,
        &[("temperature_c", 10.0), ("speed_kmh", 0.0)],
    )
    .await; // still breached: nothing
    p.send("reefer-1", t0 + 3000, &[("temperature_c", 6.0)])
        .await; // recovered: CLEARED
    p.send(
        "truck-2",
        t0,
        &[("speed_kmh", 131.0), ("battery_pct", 12.0)],
    )
    .await; // two alerts at once

    let twins = p.changelog(5);
    let reefer: Vec<_> = twins.iter().filter(|t| t.asset_id == "reefer-1").collect();
    assert_eq!(
        reefer.iter().map(|t| t.version).collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    let last = reefer[3];
    assert_eq!(prop(last, &p, "temperature_c"), Some(6.0));
    assert_eq!(
        prop(last, &p, "lat"),
        Some(52.1),
        "absent properties keep their value"
    );
    assert_eq!(prop(last, &p, "battery_pct"), Some(80.0));
    assert_eq!(
        (last.status, last.still_since.is_some()),
        (Status::Active, true),
        "standing still, but not yet for idle_after"
    );
    assert_eq!(last.event_time, t0 + 3000);
    assert_eq!(
        reefer[1].alerts.len(),
        1,
        "the twin carries its raised alert"
    );
    assert!(last.alerts.is_empty());

    let alerts = p.alerts(4);
    let reefer_alerts: Vec<_> = alerts
        .iter()
        .filter(|a| text(&a["asset_id"]) == "reefer-1")
        .collect();
    let states: Vec<_> = reefer_alerts
        .iter()
        .map(|a| (text(&a["code"]), text(&a["state"]), number(&a["value"])))
        .collect();
    assert_eq!(
        states,
        [
            ("TEMP_BREACH".into(), "RAISED".into(), 9.5),
            ("TEMP_BREACH".into(), "CLEARED".into(), 6.0)
        ]
    );
    assert_eq!(reefer_alerts[0]["alert_id"], reefer_alerts[1]["alert_id"]);
    assert_eq!(number(&reefer_alerts[0]["threshold"]), 8.0);
    assert_eq!(number(&reefer_alerts[0]["event_time"]), (t0 + 1000) as f64);
    assert_eq!(number(&reefer_alerts[1]["twin_version"]), 4.0);
    let mut truck: Vec<_> = alerts
        .iter()
        .filter(|a| text(&a["asset_id"]) == "truck-2")
        .map(|a| text(&a["code"]))
        .collect();
    truck.sort();
    assert_eq!(truck, ["LOW_BATTERY", "SPEED_BREACH"]);

    let m = p.metrics();
    assert_eq!(
        m.counter(
            "twinflow_alerts_emitted_total",
            &[("rule", "TEMP_BREACH"), ("state", "RAISED")]
        ),
        1
    );
    assert_eq!(
        m.counter(
            "twinflow_alerts_emitted_total",
            &[("rule", "TEMP_BREACH"), ("state", "CLEARED")]
        ),
        1
    );
    assert_eq!(m.total("twinflow_twin_updates_total"), 5);

    // The HTTP endpoint serves the twin from the store.
    let body: serde_json::Value =
        reqwest::get(format!("http://{}/twins/reefer-1", p.http.unwrap()))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    assert_eq!(body["properties"]["temperature_c"], 6.0);
    assert_eq!(
        body["status"], "ACTIVE",
        "still, but not yet for idle_after"
    );
    let missing = reqwest::get(format!("http://{}/twins/nope", p.http.unwrap()))
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_records_land_in_the_dead_letter_topic_with_reasons() {
    let (_kafka, mut p) = cluster();
    p.start();
    let good = p.encode("van-1", 1_790_000_000_000, &[("speed_kmh", 10.0)]);
    let out_of_range = p.encode("van-1", 1_790_000_000_001, &[("lat", 123.0)]);
    p.send_raw(Some(b"van-1"), Some(b"\x02\xff\xff garbage"))
        .await;
    p.send_raw(Some(b"van-1"), Some(&good[..good.len() - 3]))
        .await;
    p.send_raw(Some(b"van-1"), Some(&out_of_range)).await;
    p.send_raw(Some(b"someone-else"), Some(&good)).await;
    p.send_raw(None, Some(&good)).await;
    p.send_raw(Some(b"van-1"), None).await;
    p.send_raw(Some(b"van-1"), Some(&good)).await;
    p.send_raw(Some(b"van-1"), Some(&good)).await; // exact duplicate: a counted skip
    let hour = 3_600_000;
    let late = p.encode("van-1", 1_790_000_000_000 - 2 * hour, &[("speed_kmh", 5.0)]);
    p.send_raw(Some(b"van-1"), Some(&late)).await;
    let future = p.encode("van-1", p.now() + hour, &[("speed_kmh", 5.0)]);
    p.send_raw(Some(b"van-1"), Some(&future)).await;

    let dead = p.read(
        &p.topology.topics.dead_letter.name,
        8,
        std::time::Duration::from_secs(30),
    );
    let reasons: Vec<_> = dead
        .iter()
        .map(|m| header(m, "twinflow.error.reason").unwrap())
        .collect();
    let mut sorted = reasons.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        [
            "decode",
            "decode",
            "empty",
            "future",
            "invalid",
            "key_mismatch",
            "key_mismatch",
            "late"
        ]
    );
    let late = dead
        .iter()
        .find(|m| header(m, "twinflow.error.reason") == Some("late"))
        .unwrap();
    assert_eq!(header(late, "twinflow.error.stage"), Some("time"));
    assert!(
        header(late, "twinflow.error.message")
            .unwrap()
            .contains("2026-09-21T14:13:20.000Z"),
        "the message gives the twin's newest reading: {:?}",
        header(late, "twinflow.error.message")
    );
    let invalid = dead
        .iter()
        .find(|m| header(m, "twinflow.error.reason") == Some("invalid"))
        .unwrap();
    assert!(
        header(invalid, "twinflow.error.message")
            .unwrap()
            .contains("lat = 123"),
        "the message says what was wrong"
    );
    assert_eq!(header(invalid, "twinflow.error.stage"), Some("validate"));
    assert_eq!(header(invalid, "twinflow.source.topic"), Some("telemetry"));
    assert!(
        header(invalid, "twinflow.source.offset")
            .unwrap()
            .parse::<i64>()
            .is_ok()
    );
    assert_eq!(
        invalid.payload(),
        Some(&out_of_range[..]),
        "the original bytes are kept"
    );

    assert_eq!(
        p.changelog(1).len(),
        1,
        "the good reading still becomes a twin"
    );
    p.wait_consumed(10).await;
    let m = p.metrics();
    let consumed = m.total("twinflow_records_consumed_total");
    let accounted = m.total("twinflow_twin_updates_total")
        + m.total("twinflow_records_skipped_total")
        + m.total("twinflow_records_dead_lettered_total");
    assert_eq!(
        (consumed, accounted),
        (10, 10),
        "every record is an update, a skip or a dead letter"
    );
    assert_eq!(
        m.counter("twinflow_records_skipped_total", &[("reason", "duplicate")]),
        1
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_resumes_from_the_store_without_loss_or_repeats() {
    let (_kafka, mut p) = cluster();
    p.start();
    let t0 = 1_790_000_000_000;
    for i in 0..200 {
        p.send(
            &format!("truck-{}", i % 20),
            t0 + i,
            &[("speed_kmh", 50.0 + (i % 7) as f64)],
        )
        .await;
    }
    p.wait_consumed(200).await;
    p.stop().await;

    for i in 200..300 {
        p.send(
            &format!("truck-{}", i % 20),
            t0 + i,
            &[("battery_pct", 90.0 - (i % 5) as f64)],
        )
        .await;
    }
    p.start();
    p.wait_consumed(100).await;
    let twins = p.changelog(300);
    assert_eq!(
        twins.len(),
        300,
        "no reading applied twice after the restart"
    );
    let mut versions: Vec<_> = twins
        .iter()
        .map(|t| (t.asset_id.clone(), t.version))
        .collect();
    versions.sort();
    versions.dedup();
    assert_eq!(versions.len(), 300, "every (asset, version) appears once");
    let last = twins
        .iter()
        .filter(|t| t.asset_id == "truck-0")
        .max_by_key(|t| t.version)
        .unwrap();
    assert_eq!(
        last.version, 15,
        "state survived: versions continue after the restart"
    );
    assert!(
        last.value(p.topology.model.property("speed_kmh").unwrap())
            .is_some(),
        "speed from before the restart kept"
    );
    assert_eq!(
        p.metrics().total("twinflow_records_consumed_total"),
        100,
        "the restart read only new records"
    );
    p.stop().await;
}

/// A replacement instance with an empty store (the machine was lost) restores the
/// partitions' twins from the changelog before it says it is ready, and carries on from them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replacement_instance_restores_twins_before_it_is_ready() {
    let (_kafka, mut first) = cluster();
    first.start();
    let t0 = 1_790_000_000_000;
    for step in 0..3 {
        for i in 0..200 {
            let speed = 50.0 + f64::from(step);
            first
                .send(
                    &format!("truck-{i}"),
                    t0 + i64::from(step) * 1000,
                    &[("speed_kmh", speed)],
                )
                .await;
        }
    }
    first.wait_consumed(600).await;
    first.stop().await;

    let mut second = TestPipeline::new(&first.bootstrap, vehicle_topology(), &[]);
    second.start();
    let http = second.http.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while reqwest::get(format!("http://{http}/readyz"))
        .await
        .map_or(true, |r| r.status() != 200)
    {
        assert!(std::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let m = second.metrics();
    assert_eq!(
        m.total("twinflow_restore_records_total"),
        600,
        "ready only once every changelog record is restored"
    );
    assert_eq!(m.restoring_partitions.get(), 0);
    // The twin API answers from the fleet view, which catches up after readiness.
    common::wait_fleet(&second, |f| f["caught_up"] == true).await;
    let twin: serde_json::Value = reqwest::get(format!("http://{http}/twins/truck-7"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(twin["version"], 3, "the restored twin: {twin}");

    second
        .send("truck-7", t0 + 5000, &[("speed_kmh", 10.0)])
        .await;
    let versions: Vec<i64> = second
        .changelog(601)
        .iter()
        .filter(|t| t.asset_id == "truck-7")
        .map(|t| t.version)
        .collect();
    assert_eq!(
        versions,
        [1, 2, 3, 4],
        "the next reading builds on the restored twin"
    );
    second.stop().await;
}

/// A silent asset turns OFFLINE by the wall clock on a quiet partition: after its state moved
/// to a new instance with an empty store, the new owner fires the timer, once, and the
/// asset's next reading clears the alert.
#[tokio::test(flavor = "multi_thread")]
async fn offline_timer_fires_once_on_a_quiet_partition_after_a_move() {
    let (_kafka, mut first) = cluster();
    let offline_after = first
        .topology
        .model
        .time
        .offline_after
        .expect("the vehicle model has it");
    first.start();
    let t0 = 1_790_000_000_000;
    first.send("truck-a", t0, &[("speed_kmh", 50.0)]).await;
    first.wait_consumed(1).await;
    first.clock.advance(60_000);
    first.send("truck-b", t0, &[("speed_kmh", 50.0)]).await;
    first.wait_consumed(2).await;
    first.stop().await;

    // A new instance, a new store: the twins and their timers come from the changelog.
    let mut second = TestPipeline::new(&first.bootstrap, vehicle_topology(), &[]);
    second.start();
    second.clock.advance(offline_after + 1000);
    let twins = second.changelog(3);
    let a = twins
        .iter()
        .find(|t| t.version == 2)
        .expect("a second version");
    assert_eq!(
        (a.asset_id.as_str(), a.status, a.updated_at - a.last_seen),
        ("truck-a", Status::Offline, offline_after + 1000),
        "truck-a, silent for offline_after, turned offline with no input arriving"
    );
    // truck-b falls due a minute later: by then the timers have been looked at many times.
    second.clock.advance(60_000);
    let twins = second.changelog(4);
    let versions = |id: &str| {
        twins
            .iter()
            .filter(|t| t.asset_id == id)
            .map(|t| (t.version, t.status))
            .collect::<Vec<_>>()
    };
    for id in ["truck-a", "truck-b"] {
        assert_eq!(
            versions(id),
            [(1, Status::Active), (2, Status::Offline)],
            "{id} turned offline once"
        );
    }
    let alerts = second.alerts(2);
    let mut fields: Vec<_> = alerts
        .iter()
        .map(|a| (text(&a["asset_id"]), text(&a["code"]), text(&a["state"])))
        .collect();
    fields.sort();
    assert_eq!(
        fields,
        [
            ("truck-a".into(), "ASSET_OFFLINE".into(), "RAISED".into()),
            ("truck-b".into(), "ASSET_OFFLINE".into(), "RAISED".into())
        ]
    );
    let raised_a = alerts
        .iter()
        .find(|a| text(&a["asset_id"]) == "truck-a")
        .unwrap()["alert_id"]
        .clone();

    second
        .send("truck-a", t0 + 10_000, &[("speed_kmh", 40.0)])
        .await;
    let twins = second.changelog(5);
    let last_a = twins.iter().rfind(|t| t.asset_id == "truck-a").unwrap();
    assert_eq!((last_a.version, last_a.status), (3, Status::Active));
    let alerts = second.alerts(3);
    let cleared: Vec<_> = alerts
        .iter()
        .filter(|a| text(&a["state"]) == "CLEARED")
        .collect();
    assert_eq!(cleared.len(), 1);
    assert_eq!(
        (text(&cleared[0]["asset_id"]), text(&cleared[0]["code"])),
        ("truck-a".into(), "ASSET_OFFLINE".into())
    );
    assert_eq!(
        cleared[0]["alert_id"], raised_a,
        "one alert id from RAISED to CLEARED"
    );
    assert_eq!(second.metrics().total("twinflow_timers_fired_total"), 2);
    second.stop().await;
}

/// An acknowledgement on the acknowledgement topic marks the active alert in the twin and
/// emits ACKNOWLEDGED with the alert's id; a repeated, an unknown and a malformed one change
/// nothing, and are counted (the malformed one is dead-lettered).
#[tokio::test(flavor = "multi_thread")]
async fn acknowledgements_mark_the_alert_once() {
    let (_kafka, mut p) = cluster();
    p.start();
    let t0 = 1_790_000_000_000;
    p.send("reefer-9", t0, &[("temperature_c", 9.5)]).await;
    let raised = p.alerts(1);
    assert_eq!(text(&raised[0]["state"]), "RAISED");
    let id = text(&raised[0]["alert_id"]);

    let acks = p.topology.topics.acks.name.clone();
    let ack = |alert: &str| format!(r#"{{"alert_id": "{alert}", "by": "ops@depot"}}"#);
    p.send_to(&acks, Some(b"reefer-9"), Some(ack(&id).as_bytes()))
        .await;
    let alerts = p.alerts(2);
    assert_eq!(
        (
            text(&alerts[1]["state"]),
            text(&alerts[1]["alert_id"]),
            text(&alerts[1]["code"])
        ),
        ("ACKNOWLEDGED".into(), id.clone(), "TEMP_BREACH".into())
    );
    let twins = p.changelog(2);
    let alert = &twins[1].alerts[0];
    assert_eq!(
        (twins[1].version, alert.acknowledged_by.as_deref()),
        (2, Some("ops@depot")),
        "the acknowledgement is a twin change"
    );
    assert_eq!(alert.acknowledged_at, Some(p.now()));

    p.send_to(&acks, Some(b"reefer-9"), Some(ack(&id).as_bytes()))
        .await;
    p.send_to(
        &acks,
        Some(b"reefer-9"),
        Some(ack("no-such-alert").as_bytes()),
    )
    .await;
    p.send_to(&acks, Some(b"reefer-9"), Some(b"ack!")).await;
    let dead = p.read(
        &p.topology.topics.dead_letter.name,
        1,
        std::time::Duration::from_secs(30),
    );
    assert_eq!(header(&dead[0], "twinflow.error.stage"), Some("ack"));
    let m = p.metrics();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while m.total("twinflow_alert_acks_total") < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "acknowledgements not counted"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let count = |result: &str| {
        m.registry()
            .gather()
            .iter()
            .filter(|f| f.name() == "twinflow_alert_acks_total")
            .flat_map(|f| f.get_metric().to_vec())
            .find(|x| x.get_label().iter().any(|l| l.value() == result))
            .map_or(0.0, |x| x.get_counter().value())
    };
    assert_eq!(
        [count("applied"), count("repeated"), count("unknown")],
        [1.0, 1.0, 1.0]
    );

    // Cleared: its events keep the one alert id; acknowledging it now is a no-op.
    p.send("reefer-9", t0 + 1000, &[("temperature_c", 5.0)])
        .await;
    let alerts = p.alerts(3);
    assert_eq!(
        (text(&alerts[2]["state"]), text(&alerts[2]["alert_id"])),
        ("CLEARED".into(), id)
    );
    p.stop().await;
}

/// Every metric the shipped Grafana dashboard queries is exported by a running pipeline that
/// went through what the panels show (readings, alerts, dead letters, a restore into a new
/// store, a broker outage), and every label a panel groups by, filters on or names in its
/// legend is a label of the metric it queries.
#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_queries_only_exported_metrics_and_labels() {
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::root().join("docker/grafana/dashboards/twinflow.json"))
            .unwrap(),
    )
    .expect("the dashboard is valid JSON");
    // Per target: the metrics it queries and the labels it uses.
    let mut targets: Vec<(Vec<String>, Vec<String>)> = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let names = |from: &str| -> Vec<String> {
                from.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .filter(|w| !w.is_empty())
                    .map(str::to_owned)
                    .collect()
            };
            let metrics: Vec<String> = names(expr)
                .into_iter()
                .filter(|w| w.starts_with("twinflow_"))
                .collect();
            let mut labels = Vec::new();
            // `by (a, b)` and `without (a)`.
            for keyword in ["by (", "without ("] {
                for part in expr.split(keyword).skip(1) {
                    labels.extend(names(part.split(')').next().unwrap()));
                }
            }
            // Selectors: `metric{label="x", other=~"y"}`.
            for part in expr.split('{').skip(1) {
                let selector = part.split('}').next().unwrap();
                for matcher in selector.split(',') {
                    let label = matcher.split(['=', '!']).next().unwrap().trim();
                    if !label.is_empty() {
                        labels.push(label.to_owned());
                    }
                }
            }
            // Legend templates: `{{label}}`.
            let legend = target["legendFormat"].as_str().unwrap_or("");
            for part in legend.split("{{").skip(1) {
                labels.push(part.split("}}").next().unwrap().trim().to_owned());
            }
            assert!(
                !metrics.is_empty(),
                "a panel target without a metric: {expr}"
            );
            targets.push((metrics, labels));
        }
    }
    let queried: std::collections::BTreeSet<&String> =
        targets.iter().flat_map(|(m, _)| m).collect();
    assert!(queried.len() > 10, "{queried:?}");

    let (kafka, mut first) = cluster();
    first.start();
    let t0 = 1_790_000_000_000;
    first.send("reefer-1", t0, &[("temperature_c", 9.5)]).await;
    first.send_raw(Some(b"reefer-1"), Some(b"garbage")).await;
    first.wait_consumed(2).await;
    first.stop().await;
    let mut second = TestPipeline::new(&first.bootstrap, vehicle_topology(), &[]);
    second.start();
    second
        .send("reefer-1", t0 + 1000, &[("temperature_c", 5.0)])
        .await;
    second.wait_consumed(1).await;
    kafka.broker_down(1).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while second.metrics().total("twinflow_kafka_errors_total") == 0 {
        assert!(std::time::Instant::now() < deadline, "no client error seen");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    kafka.broker_up(1).unwrap();

    let page = reqwest::get(format!("http://{}/metrics", second.http.unwrap()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let exported = |name: &str| {
        page.lines().any(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with(['{', ' ']))
        })
    };
    let missing: Vec<_> = queried.iter().filter(|n| !exported(n)).collect();
    assert!(missing.is_empty(), "queried but not exported: {missing:?}");
    // A label is a metric's if a series of it carries `label="`.
    let labelled = |name: &str, label: &str| {
        page.lines().any(|l| {
            l.strip_prefix(name).is_some_and(|r| {
                r.starts_with('{')
                    && r.split('}')
                        .next()
                        .unwrap()
                        .contains(&format!("{label}=\""))
            })
        })
    };
    let mut wrong = Vec::new();
    for (metrics, labels) in &targets {
        for label in labels {
            if !metrics.iter().any(|m| labelled(m, label)) {
                wrong.push(format!("{label} on {metrics:?}"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "labels the metrics do not have: {wrong:?}"
    );
    second.stop().await;
}

/// The twin semantics, computed here independently of the record logic, hold for a simulated
/// fleet sent through the pipeline: per asset and property the value of the newest event time
/// wins (on a tie, the later arrival); a reading more than `allowed_lateness` behind its
/// asset's newest applied reading, or more than `max_future` ahead of processing time, is not
/// applied, and neither is a malformed record (the simulator says which are); every record
/// that is not applied is dead-lettered. The last changelog twin of every asset says exactly
/// that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twins_hold_the_newest_value_of_every_property() {
    use std::collections::BTreeMap;
    use std::time::Duration;
    use twinflow::codec::Format;
    use twinflow::demo::sim::{Fleet, FleetConfig};
    use twinflow::twin::Reading;

    /// What an asset's twin must hold: its newest event time, and per property the event
    /// time and value of the reading that set it.
    #[derive(Default)]
    struct Expected {
        event_time: Option<i64>,
        props: BTreeMap<usize, (i64, Value)>,
    }

    const RECORDS: usize = 20_000;
    let (_kafka, mut p) = cluster();
    p.start();
    let now = p.now();
    let config = FleetConfig {
        assets: 300,
        seed: 11,
        malformed: 0.01,
        start_ms: now - 600_000,
        interval_ms: 1000,
    };
    let mut fleet = Fleet::new(config, &p.topology).unwrap();
    let time = p.topology.model.time;
    let (lateness, future) = (time.allowed_lateness.unwrap(), time.max_future.unwrap());
    let mut expected: BTreeMap<String, Expected> = BTreeMap::new();
    let (mut input, mut reading, mut not_applied) = (Vec::new(), Reading::default(), 0u64);
    for _ in 0..RECORDS {
        let (mut key, mut value) = (Vec::new(), Vec::new());
        let kind = fleet.next_record(&mut key, &mut value);
        let valid = !kind.is_malformed();
        if valid {
            let codec = &p.topology.codec;
            codec
                .decode_reading(Format::Avro, &value, &mut reading)
                .unwrap();
        }
        input.push((key, value));
        if !valid {
            not_applied += 1;
            continue;
        }
        let e = expected.entry(reading.asset_id.clone()).or_default();
        let late = e
            .event_time
            .is_some_and(|newest| reading.event_time < newest - lateness);
        if late || reading.event_time > now + future {
            not_applied += 1;
            continue;
        }
        e.event_time = Some(e.event_time.unwrap_or(i64::MIN).max(reading.event_time));
        for (property, value) in &reading.values {
            let at = e.props.get(property).map(|(at, _)| *at);
            if at.is_none_or(|at| reading.event_time >= at) {
                e.props
                    .insert(*property, (reading.event_time, value.clone()));
            }
        }
    }
    expected.retain(|_, e| e.event_time.is_some());
    assert!(
        not_applied > 0 && expected.len() > 250,
        "{not_applied} not applied"
    );

    let mut client = rdkafka::ClientConfig::new();
    client.set("bootstrap.servers", &p.bootstrap);
    let telemetry = p.topology.topics.telemetry.name.clone();
    let sender = common::instance::feed(&client, &telemetry, &input, 1000, Duration::ZERO);
    tokio::task::spawn_blocking(move || sender.join())
        .await
        .unwrap()
        .unwrap();
    p.wait_consumed(RECORDS as u64).await;
    let metrics = p.metrics();
    let dead = metrics.total("twinflow_records_dead_lettered_total");
    assert_eq!(
        dead, not_applied,
        "every record not applied is dead-lettered"
    );

    let updates = metrics.total("twinflow_twin_updates_total") as usize;
    let mut last = BTreeMap::new();
    for twin in p.changelog(updates) {
        last.insert(twin.asset_id.clone(), twin);
    }
    assert_eq!(
        last.len(),
        expected.len(),
        "a twin for every asset with a reading applied"
    );
    for (id, e) in &expected {
        let twin = &last[id];
        assert_eq!(Some(twin.event_time), e.event_time, "{id}: event time");
        let held: BTreeMap<usize, (i64, Value)> = twin
            .props
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.as_ref().map(|p| (i, (p.time, p.value.clone()))))
            .collect();
        assert_eq!(held, e.props, "{id}: properties");
    }
    p.stop().await;
}
