//! The MQTT bridge against a real MQTT broker (mosquitto) and a Kafka-protocol cluster
//! (the embedded mock cluster), with devices on paho-mqtt: readings and acknowledgements
//! in, hostile messages dead-lettered, commands out to a device that acts on them, kills
//! of the bridge process and a Kafka outage without a reading lost.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::instance::read_all;
use common::mqtt::{BROKER_MAX_PACKET, Mosquitto, Obeying, bridge_config, publish};
use common::{TestPipeline, free_port, header, http_get, on_embedded, processed_once};
use rdkafka::Message;
use rdkafka::message::OwnedMessage;
use tokio_util::sync::CancellationToken;
use twinflow::config::{Config, Secret};
use twinflow::metrics::BridgeMetrics;
use twinflow::topology::Topology;

const WRITE: &str = "ops-write-token-0123456789";

/// A bridge running in this process until its token is cancelled.
struct InProcess {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), twinflow::Error>>,
    metrics: BridgeMetrics,
}

impl InProcess {
    fn start(config: &std::path::Path) -> InProcess {
        let config = Config::load(config).unwrap();
        let metrics = BridgeMetrics::new(prometheus::Registry::new());
        let stop = CancellationToken::new();
        let (m, s) = (metrics.clone(), stop.clone());
        let task = tokio::spawn(async move { twinflow::bridge::run(&config, m, s).await });
        InProcess {
            stop,
            task,
            metrics,
        }
    }

    /// A counter or gauge of the bridge, summed over the series with `labels`.
    fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.metrics.value(name, labels)
    }

    async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap().expect("a clean stop");
    }
}

/// A reading as a device sends it.
fn reading(event_time: i64, fields: &[(&str, serde_json::Value)]) -> Vec<u8> {
    let mut o = serde_json::Map::new();
    o.insert("event_time".into(), event_time.into());
    for (k, v) in fields {
        o.insert((*k).into(), v.clone());
    }
    serde_json::to_vec(&o).unwrap()
}

fn telemetry(asset: &str) -> String {
    format!("assets/{asset}/telemetry")
}

/// Reads `topic` until it holds `n` records (30 s at most), then checks it holds no more.
fn exactly(p: &TestPipeline, topic: &str, n: usize) -> Vec<OwnedMessage> {
    let records = p.read(topic, n, Duration::from_secs(30));
    let all = read_all(&p.bootstrap, topic, &[]);
    assert_eq!(all.len(), n, "{topic} holds exactly {n} records");
    records
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn device_readings_and_acknowledgements_reach_kafka_and_hostile_messages_are_dead_lettered() {
    let (_kafka, p) = on_embedded(common::untimed_vehicle_topology());
    let mqtt = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let config = bridge_config(
        dir.path(),
        &p.bootstrap,
        mqtt.port,
        free_port(),
        "field_map = { tempC = \"temperature_c\" }",
    );
    let bridge = InProcess::start(&config);
    let t = 1_800_000_000_000_i64;

    let mut messages: Vec<(String, Vec<u8>)> = Vec::new();
    for asset in ["truck-1", "truck-2", "truck-3", "truck-4"] {
        for i in 0..5 {
            let fields = [("speed_kmh", (10 + i).into()), ("tempC", 5.5.into())];
            messages.push((telemetry(asset), reading(t + i * 1000, &fields)));
        }
    }
    // Naming its own asset in the payload is fine.
    messages.push((
        telemetry("truck-1"),
        reading(
            t + 9000,
            &[("asset_id", "truck-1".into()), ("battery_pct", 80.into())],
        ),
    ));
    messages.push((
        "assets/truck-2/commands/ack".into(),
        br#"{"command_id": "c-1", "result": "done"}"#.to_vec(),
    ));
    // A flood from one device: every reading arrives, in order.
    for i in 0..2000 {
        messages.push((
            telemetry("flooder"),
            reading(t + i, &[("speed_kmh", (i % 300).into())]),
        ));
    }
    // Hostile messages, each with the dead-letter reason it must get.
    let near_limit = vec![b'x'; BROKER_MAX_PACKET - 1024];
    let hostile: Vec<(String, Vec<u8>, &str)> = vec![
        (telemetry("truck-3"), vec![0xff, 0xfe, 0x00, 0x7b], "decode"),
        (
            telemetry("truck-3"),
            reading(t, &[("speed_kmh", "fast".into())]),
            "decode",
        ),
        (telemetry("truck-3"), b"[1, 2]".to_vec(), "decode"),
        (
            telemetry("truck-1"),
            reading(t, &[("asset_id", "truck-9".into())]),
            "identity",
        ),
        (telemetry(".."), reading(t + 1, &[]), "identity"),
        (telemetry("bad id!"), reading(t + 2, &[]), "identity"),
        (telemetry("truck-1"), Vec::new(), "empty"),
        (telemetry("truck-4"), near_limit.clone(), "decode"),
    ];
    for (topic, payload, _) in &hostile {
        messages.push((topic.clone(), payload.clone()));
    }
    let port = mqtt.port;
    let refused = tokio::task::spawn_blocking(move || publish(port, &messages, 4, "in"))
        .await
        .unwrap();
    assert_eq!(
        refused,
        Vec::<usize>::new(),
        "the broker takes every message"
    );
    // Over the broker's packet limit: refused at the door, and the device is told (its
    // connection is closed); nothing of it reaches the bridge.
    let oversized = vec![(telemetry("truck-4"), vec![b'{'; BROKER_MAX_PACKET + 1])];
    let refused = tokio::task::spawn_blocking(move || publish(port, &oversized, 1, "big"))
        .await
        .unwrap();
    assert_eq!(refused, vec![0], "the oversized message is refused");

    let topics = &p.topology.topics;
    let readings = exactly(&p, &topics.telemetry.name, 20 + 1 + 2000);
    let mut per_asset: BTreeMap<String, Vec<twinflow::twin::Reading>> = BTreeMap::new();
    for m in &readings {
        let mut r = twinflow::twin::Reading::default();
        p.topology
            .codec
            .decode_reading(twinflow::codec::Format::Avro, m.payload().unwrap(), &mut r)
            .expect("the bridge writes the telemetry topic's format");
        assert_eq!(m.key(), Some(r.asset_id.as_bytes()), "keyed by asset id");
        per_asset.entry(r.asset_id.clone()).or_default().push(r);
    }
    assert_eq!(per_asset["truck-2"].len(), 5);
    let temperature = p.topology.model.property("temperature_c").unwrap();
    assert!(
        per_asset["truck-2"].iter().all(|r| r
            .values
            .contains(&(temperature, twinflow::twin::Value::Double(5.5)))),
        "tempC is mapped to temperature_c"
    );
    let flood: Vec<i64> = per_asset["flooder"].iter().map(|r| r.event_time).collect();
    assert_eq!(
        flood,
        (0..2000).map(|i| t + i).collect::<Vec<_>>(),
        "in order, none lost"
    );

    let acks = exactly(&p, &topics.acks.name, 1);
    assert_eq!(acks[0].key(), Some(&b"truck-2"[..]));
    assert_eq!(
        acks[0].payload(),
        Some(&br#"{"command_id": "c-1", "result": "done"}"#[..])
    );

    let dead = exactly(&p, &topics.dead_letter.name, hostile.len());
    let mut by_payload: HashMap<Vec<u8>, &OwnedMessage> = HashMap::new();
    for m in &dead {
        assert_eq!(header(m, "twinflow.error.stage"), Some("bridge"));
        by_payload.insert(m.payload().unwrap_or_default().to_vec(), m);
    }
    for (topic, payload, reason) in &hostile {
        let m = by_payload
            .get(payload)
            .unwrap_or_else(|| panic!("a dead letter carries the payload sent to {topic}"));
        assert_eq!(header(m, "twinflow.error.reason"), Some(*reason), "{topic}");
        assert_eq!(header(m, "twinflow.source.topic"), Some(topic.as_str()));
        assert!(!header(m, "twinflow.error.message").unwrap().is_empty());
    }
    let near = by_payload[&near_limit];
    assert_eq!(
        near.key(),
        Some(&b"truck-4"[..]),
        "the topic's asset id is the key"
    );

    let count = |source, result| {
        bridge.metric(
            "twinflow_ingest_records_total",
            &[("source", source), ("result", result)],
        )
    };
    assert_eq!(count("mqtt", "accepted"), 2021.0);
    assert_eq!(count("mqtt_ack", "accepted"), 1.0);
    assert_eq!(count("mqtt", "decode"), 4.0);
    assert_eq!(count("mqtt", "identity"), 3.0);
    assert_eq!(count("mqtt", "empty"), 1.0);
    assert_eq!(bridge.metric("twinflow_ingest_in_flight", &[]), 0.0);
    bridge.stop().await;
}
