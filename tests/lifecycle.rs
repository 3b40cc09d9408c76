//! The end of a twin, on the embedded mock cluster and a controlled clock: `DELETE
//! /twins/{id}` and a control record on the desired-state topic delete a twin in one commit
//! (tombstone with its headers on the changelog and the history, CLEARED with reason
//! `deleted`, CANCELLED commands, the view's entry gone); readings of a deleted id are
//! refused for `refuse_deleted_for`, also after a restore into an empty store, and create
//! the twin again at version 1 afterwards; `retire_after` deletes a silent twin by timer.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{TestPipeline, header, on_embedded, root, text};
use rdkafka::Message;
use rdkafka::message::{Header, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use twinflow::config::{Secret, TopologyConfig};

const READ: &str = "read-token-0123456789";
const WRITE: &str = "ops-write-token-0123456789";
const HOUR: i64 = 3_600_000;
const DAY: i64 = 24 * HOUR;

/// The vehicle model with a `[lifecycle]` section.
fn lifecycle_topology(lifecycle: &str) -> (tempfile::TempDir, TopologyConfig) {
    let dir = tempfile::tempdir().unwrap();
    let model = std::fs::read_to_string(root().join("topology/vehicle.toml")).unwrap();
    let schemas = format!("\"{}/", root().join("schemas").display());
    let model = model.replace("\"../schemas/", &schemas) + "\n[lifecycle]\n" + lifecycle;
    std::fs::write(dir.path().join("vehicle.toml"), model).unwrap();
    let paths = TopologyConfig {
        topics: root().join("topology/topics.toml"),
        model: dir.path().join("vehicle.toml"),
    };
    (dir, paths)
}

fn credentials(p: &mut TestPipeline) {
    p.token = Some(Secret(READ.into()));
    p.writers = BTreeMap::from([("ops".into(), Secret(WRITE.into()))]);
}

async fn request(
    p: &TestPipeline,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> (u16, serde_json::Value) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut r = reqwest::Client::new().request(method, format!("http://{}{path}", p.http.unwrap()));
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    let r = r.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or_default())
}

/// Waits until `GET path` answers `status` with a body that satisfies `check`.
async fn until(
    p: &TestPipeline,
    path: &str,
    status: u16,
    check: impl Fn(&serde_json::Value) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (got, body) = request(p, "GET", path, Some(READ)).await;
        if got == status && check(&body) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{path} never answered {status} as wanted: {got} {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The records of `topic` keyed `key`, in offset order (the asset's records share a partition).
fn of(p: &TestPipeline, topic: &str, n: usize, key: &str) -> Vec<OwnedMessage> {
    p.read(topic, n, Duration::from_secs(30))
        .into_iter()
        .filter(|m| m.key() == Some(key.as_bytes()))
        .collect()
}

/// The alert events of `asset` as `(code, state, reason, twin_version)`.
fn alert_events(
    p: &TestPipeline,
    n: usize,
    asset: &str,
) -> Vec<(String, String, Option<String>, i64)> {
    p.alerts(n)
        .into_iter()
        .filter(|a| text(&a["asset_id"]) == asset)
        .map(|a| {
            let reason = match &a["reason"] {
                apache_avro::types::Value::Union(1, r) => Some(text(r)),
                _ => None,
            };
            let apache_avro::types::Value::Long(version) = a["twin_version"] else {
                panic!("twin_version is a long")
            };
            (text(&a["code"]), text(&a["state"]), reason, version)
        })
        .collect()
}

/// The dead letters' reasons, in order.
fn dead_letter_reasons(p: &TestPipeline, n: usize) -> Vec<String> {
    p.read(
        &p.topology.topics.dead_letter.name,
        n,
        Duration::from_secs(30),
    )
    .iter()
    .map(|m| header(m, "twinflow.error.reason").unwrap().to_owned())
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deleted_twin_is_gone_everywhere_and_its_id_refused_for_a_while() {
    let (_dir, paths) = lifecycle_topology("refuse_deleted_for = \"1h\"\n");
    let (kafka, mut p) = on_embedded(paths.clone());
    credentials(&mut p);
    p.start();
    let topics = p.topology.topics.clone();
    let t0 = p.now();
    // reefer-1: TEMP_BREACH raised (its action issues a setpoint command) and SPEED_BREACH.
    p.send(
        "reefer-1",
        t0,
        &[("temperature_c", 9.0), ("speed_kmh", 150.0)],
    )
    .await;
    p.send("reefer-2", t0, &[("temperature_c", 4.0)]).await;
    p.send("reefer-3", t0, &[("temperature_c", 4.0)]).await;
    until(&p, "/twins/reefer-1", 200, |t| {
        t["active_alerts"].as_array().unwrap().len() == 2
            && t["commands"].as_array().is_some_and(|c| c.len() == 1)
    })
    .await;
    until(&p, "/fleet", 200, |f| f["twins"] == 3).await;
    let last = request(&p, "GET", "/twins/reefer-1", Some(READ)).await.1["version"]
        .as_i64()
        .unwrap();

    // A delete is a write: the read token cannot, no token is asked for one, and an
    // unknown twin is 404.
    assert_eq!(
        request(&p, "DELETE", "/twins/reefer-1", Some(READ)).await.0,
        403
    );
    assert_eq!(request(&p, "DELETE", "/twins/reefer-1", None).await.0, 401);
    assert_eq!(
        request(&p, "DELETE", "/twins/nobody", Some(WRITE)).await.0,
        404
    );
    let (status, body) = request(&p, "DELETE", "/twins/reefer-1?wait=20s", Some(WRITE)).await;
    assert_eq!(
        (status, &body["state"]),
        (200, &serde_json::json!("DELETED")),
        "{body}"
    );
    let deleted_at = p.now();
    assert_eq!(
        request(&p, "GET", "/twins/reefer-1", Some(READ)).await.0,
        404
    );
    until(&p, "/fleet", 200, |f| f["twins"] == 2).await;
    until(&p, "/alerts", 200, |a| {
        a["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .all(|x| x["asset_id"] != "reefer-1")
    })
    .await;

    // The changelog and the history end the twin with the same tombstone, saying how.
    for topic in [
        &topics.changelog.name,
        &topics.history.as_ref().unwrap().name,
    ] {
        let records = of(&p, topic, last as usize + 3, "reefer-1");
        assert_eq!(
            records.len(),
            last as usize + 1,
            "{topic}: every version, then the tombstone"
        );
        let tombstone = records.last().unwrap();
        assert_eq!(tombstone.payload(), None, "{topic}");
        assert_eq!(
            header(tombstone, "twinflow.deleted.cause"),
            Some("requested")
        );
        assert_eq!(header(tombstone, "twinflow.deleted.by"), Some("http:ops"));
        let version = (last + 1).to_string();
        assert_eq!(
            header(tombstone, "twinflow.deleted.version"),
            Some(version.as_str())
        );
        let at = deleted_at.to_string();
        assert_eq!(header(tombstone, "twinflow.deleted.at"), Some(at.as_str()));
    }
    // Each raised alert CLEARED with reason deleted, in the deletion's version.
    let events = alert_events(&p, 4, "reefer-1");
    let cleared: Vec<_> = events.iter().filter(|e| e.1 == "CLEARED").collect();
    assert_eq!(events.len(), 4, "{events:?}");
    assert_eq!(cleared.len(), 2, "{events:?}");
    for e in cleared {
        assert_eq!(
            (e.2.as_deref(), e.3),
            (Some("deleted"), last + 1),
            "{events:?}"
        );
    }
    // Its open command CANCELLED.
    let schema = apache_avro::Schema::parse_str(twinflow::codec::COMMAND_EVENT_SCHEMA).unwrap();
    let states: Vec<String> = of(&p, &topics.command_events.name, 2, "reefer-1")
        .iter()
        .map(|m| {
            let apache_avro::types::Value::Record(f) =
                common::avro_read(&schema, m.payload().unwrap())
            else {
                panic!("a record")
            };
            text(&f.iter().find(|(k, _)| k == "state").unwrap().1)
        })
        .collect();
    assert_eq!(states, ["ISSUED", "CANCELLED"]);
    let m = p.metrics();
    assert_eq!(
        m.counter("twinflow_twin_deletions_total", &[("kind", "requested")]),
        1
    );

    // A control record on the desired-state topic deletes too, whoever sends it; an unknown
    // control is dead-lettered.
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap_servers())
        .create()
        .unwrap();
    for (asset, control) in [("reefer-3", "delete"), ("reefer-2", "archive")] {
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "twinflow.control",
                value: Some(control),
            })
            .insert(Header {
                key: "twinflow.control.by",
                value: Some("erp"),
            });
        let record = FutureRecord::<str, [u8]>::to(&topics.desired.name)
            .key(asset)
            .headers(headers);
        producer
            .send(record, Duration::from_secs(10))
            .await
            .unwrap();
    }
    until(&p, "/twins/reefer-3", 404, |_| true).await;
    let tombstone = of(&p, &topics.changelog.name, last as usize + 4, "reefer-3")
        .pop()
        .unwrap();
    assert_eq!(header(&tombstone, "twinflow.deleted.by"), Some("erp"));
    assert_eq!(dead_letter_reasons(&p, 1), ["invalid"]);
    assert_eq!(
        request(&p, "GET", "/twins/reefer-2", Some(READ)).await.0,
        200
    );

    // Within refuse_deleted_for a reading of a deleted id is refused.
    p.clock.advance(HOUR - 2000);
    p.send("reefer-1", p.now(), &[("temperature_c", 5.0)]).await;
    assert_eq!(dead_letter_reasons(&p, 2), ["invalid", "deleted"]);

    // A new instance on an empty store restores the partitions from the changelog:
    // reefer-1 and reefer-3 gone, their ids still refused (the tombstone says when the twin
    // was deleted); after the hour a reading creates reefer-1 again at version 1.
    p.stop().await;
    let mut q = TestPipeline::new(&kafka.bootstrap_servers(), paths, &[]);
    q.group = p.group.clone();
    q.clock = p.clock.clone();
    credentials(&mut q);
    q.start();
    q.send("reefer-3", q.now(), &[("temperature_c", 5.5)]).await;
    assert_eq!(
        dead_letter_reasons(&q, 3),
        ["invalid", "deleted", "deleted"]
    );
    q.clock.advance(3000);
    q.send("reefer-1", q.now(), &[("temperature_c", 5.0)]).await;
    until(&q, "/twins/reefer-1", 200, |t| {
        t["version"] == 1 && t["active_alerts"] == serde_json::json!([])
    })
    .await;
    assert_eq!(
        request(&q, "GET", "/twins/reefer-3", Some(READ)).await.0,
        404
    );
    until(&q, "/fleet", 200, |f| f["twins"] == 2).await;
    q.stop().await;
    let store = twinflow::store::Store::open(&q.config().store.path).unwrap();
    let stored: usize = (0..topics.telemetry.partitions)
        .map(|n| store.partition(n).count().unwrap())
        .sum();
    assert_eq!(
        stored, 2,
        "the restored store holds reefer-1 and reefer-2 only"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_twin_silent_for_retire_after_is_deleted_by_its_timer() {
    let (_dir, paths) = lifecycle_topology("retire_after = \"90d\"\n");
    let (_kafka, mut p) = on_embedded(paths);
    credentials(&mut p);
    p.start();
    let t0 = p.now();
    p.send("old-1", t0, &[("battery_pct", 10.0)]).await;
    p.send("fresh-1", t0, &[("battery_pct", 80.0)]).await;
    until(&p, "/fleet", 200, |f| f["twins"] == 2).await;
    // Both go OFFLINE after five minutes; fresh-1 reports again on day 89.
    p.clock.advance(89 * DAY);
    until(&p, "/twins/old-1", 200, |t| t["status"] == "OFFLINE").await;
    p.send("fresh-1", p.now(), &[("battery_pct", 70.0)]).await;
    until(&p, "/twins/fresh-1", 200, |t| t["status"] == "ACTIVE").await;
    let last = request(&p, "GET", "/twins/old-1", Some(READ)).await.1["version"]
        .as_i64()
        .unwrap();
    p.clock.advance(DAY - 1000);
    // Not yet: one second before ninety days of silence.
    p.send("fresh-1", p.now(), &[("battery_pct", 69.0)]).await;
    until(&p, "/twins/fresh-1", 200, |t| {
        t["properties"]["battery_pct"] == 69.0
    })
    .await;
    assert_eq!(request(&p, "GET", "/twins/old-1", Some(READ)).await.0, 200);
    p.clock.advance(1000);
    until(&p, "/twins/old-1", 404, |_| true).await;
    until(&p, "/fleet", 200, |f| f["twins"] == 1).await;

    let topics = &p.topology.topics;
    let tombstone = of(&p, &topics.changelog.name, last as usize + 1 + 4, "old-1")
        .pop()
        .unwrap();
    assert_eq!(tombstone.payload(), None);
    assert_eq!(
        header(&tombstone, "twinflow.deleted.cause"),
        Some("retired")
    );
    assert_eq!(header(&tombstone, "twinflow.deleted.by"), Some(""));
    // Its LOW_BATTERY and ASSET_OFFLINE alerts end with it.
    let mut cleared: Vec<_> = alert_events(&p, 4, "old-1")
        .into_iter()
        .filter(|e| e.1 == "CLEARED")
        .map(|e| (e.0, e.2, e.3))
        .collect();
    cleared.sort();
    let deleted = |code: &str| (code.to_owned(), Some("deleted".to_owned()), last + 1);
    assert_eq!(cleared, [deleted("ASSET_OFFLINE"), deleted("LOW_BATTERY")]);
    let m = p.metrics();
    assert_eq!(
        m.counter("twinflow_twin_deletions_total", &[("kind", "retired")]),
        1
    );
    p.stop().await;
}
