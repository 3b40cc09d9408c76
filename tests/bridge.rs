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
use common::{TestPipeline, free_port, header, on_embedded, processed_once};
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
    /// Starts the bridge and waits until it is subscribed (devices may publish then).
    async fn start(config: &std::path::Path) -> InProcess {
        let config = Config::load(config).unwrap();
        let metrics = BridgeMetrics::new(prometheus::Registry::new());
        let stop = CancellationToken::new();
        let (m, s) = (metrics.clone(), stop.clone());
        let task = tokio::spawn(async move { twinflow::bridge::run(&config, m, s).await });
        let bridge = InProcess {
            stop,
            task,
            metrics,
        };
        eventually("the bridge subscribes", async || {
            bridge.metric("twinflow_bridge_connected", &[]) == 1.0
        })
        .await;
        bridge
    }

    /// A bridge between Kafka at `bootstrap` and the MQTT broker on `mqtt_port`, with
    /// `[ingest.mqtt]` lines `extra` (its configuration lives in the returned directory).
    async fn between(
        bootstrap: &str,
        mqtt_port: u16,
        extra: &str,
    ) -> (tempfile::TempDir, InProcess) {
        let dir = tempfile::tempdir().unwrap();
        let config = bridge_config(dir.path(), bootstrap, mqtt_port, free_port(), extra);
        let bridge = InProcess::start(&config).await;
        (dir, bridge)
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

/// Publishes `messages` from `clients` device connections (on a blocking thread); the
/// indexes of those the broker refused.
async fn published(
    port: u16,
    messages: Vec<(String, Vec<u8>)>,
    clients: usize,
    tag: &'static str,
) -> Vec<usize> {
    tokio::task::spawn_blocking(move || publish(port, &messages, clients, tag))
        .await
        .unwrap()
}

/// A device `asset` publishes one reading, which reaches the telemetry topic.
async fn a_reading_reaches_kafka(p: &TestPipeline, port: u16, asset: &str) {
    let messages = vec![(
        telemetry(asset),
        reading(1_800_000_000_000, &[("speed_kmh", 3.into())]),
    )];
    assert!(published(port, messages, 1, "one").await.is_empty());
    let records = p.read(
        &p.topology.topics.telemetry.name,
        1,
        Duration::from_secs(30),
    );
    assert_eq!(records[0].key(), Some(asset.as_bytes()));
}

/// Reads `topic` until it holds `n` records (30 s at most), then checks it holds no more.
fn exactly(p: &TestPipeline, topic: &str, n: usize) -> Vec<OwnedMessage> {
    let records = p.read(topic, n, Duration::from_secs(30));
    let all = read_all(&p.bootstrap, topic, &[]);
    assert_eq!(all.len(), n, "{topic} holds exactly {n} records");
    records
}

/// The embedded cluster with the topics, mosquitto, and a subscribed bridge between them
/// with `[ingest.mqtt]` lines `extra`; the pipeline is not started.
async fn rig(
    extra: &str,
) -> (
    twinflow::demo::embedded::EmbeddedKafka,
    TestPipeline,
    Mosquitto,
    tempfile::TempDir,
    InProcess,
) {
    let (kafka, p) = on_embedded(common::untimed_vehicle_topology());
    let mqtt = Mosquitto::start();
    let (dir, bridge) = InProcess::between(&p.bootstrap, mqtt.port, extra).await;
    (kafka, p, mqtt, dir, bridge)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn device_readings_and_acknowledgements_reach_kafka_and_hostile_messages_are_dead_lettered() {
    let (_kafka, p, mqtt, _dir, bridge) = rig("field_map = { tempC = \"temperature_c\" }").await;
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
    let refused = published(port, messages, 4, "in").await;
    assert_eq!(
        refused,
        Vec::<usize>::new(),
        "the broker takes every message"
    );
    // Over the broker's packet limit: refused at the door, and the device is told (its
    // connection is closed); nothing of it reaches the bridge.
    let oversized = vec![(telemetry("truck-4"), vec![b'{'; BROKER_MAX_PACKET + 1])];
    let refused = published(port, oversized, 1, "big").await;
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

/// Polls `check` every 20 ms until it holds, failing after 30 s with `what`.
async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check().await {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_desired_value_set_over_http_reaches_an_mqtt_device_that_acts_and_the_command_converges()
{
    let (_kafka, mut p) = on_embedded(common::vehicle_topology());
    p.writers = BTreeMap::from([("ops".into(), Secret(WRITE.into()))]);
    p.start();
    let mqtt = Mosquitto::start();
    let (_dir, bridge) = InProcess::between(&p.bootstrap, mqtt.port, "").await;
    let http = reqwest::Client::new();
    let api = format!("http://{}", p.http.unwrap());
    let twin = async |id: &str| -> serde_json::Value {
        let r = http.get(format!("{api}/twins/{id}")).send().await.unwrap();
        r.json().await.unwrap_or_default()
    };

    // The device reported once and holds a persistent session for its commands, but is
    // offline when the value is set.
    p.send("reefer-7", p.now(), &[("temperature_c", 6.0)]).await;
    Obeying::start(mqtt.port, "reefer-7", 0, "reefer-7", 0).wait();
    eventually("the twin exists", async || {
        twin("reefer-7").await["version"] == 1
    })
    .await;
    let r = http
        .patch(format!("{api}/twins/reefer-7/desired?wait=20s"))
        .bearer_auth(WRITE)
        .header("content-type", "application/merge-patch+json")
        .body(r#"{"temperature_c": 3.0}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let issued: serde_json::Value = r.json().await.unwrap();
    assert_eq!(issued["state"], "ISSUED", "{issued}");
    let command_id = issued["command_id"].as_str().unwrap().to_owned();
    // The bridge publishes it while the device is away; the broker keeps it for the
    // device's session.
    eventually("the bridge publishes the command", async || {
        bridge.metric("twinflow_bridge_commands_total", &[("result", "published")]) == 1.0
    })
    .await;

    // The device comes back, gets the command it missed, acts (its temperature reaches
    // the setpoint) and acknowledges.
    let device = Obeying::start(mqtt.port, "reefer-7", 1, "reefer-7", p.now() + 1000);
    let got = device.only_command().await;
    assert_eq!(got["topic"], "assets/reefer-7/commands");
    let command = &got["command"];
    assert_eq!(command["command_id"], command_id.as_str());
    assert_eq!(
        command["values"],
        serde_json::json!({ "temperature_c": 3.0 })
    );
    // MQTT 5 message expiry: the broker drops the command once it expires.
    let expires_at = humantime::parse_rfc3339(command["expires_at"].as_str().unwrap()).unwrap();
    let left = expires_at
        .duration_since(std::time::SystemTime::now())
        .unwrap()
        .as_secs_f64();
    let expiry = got["expiry"].as_f64().expect("a message expiry");
    assert!(
        (expiry - left).abs() < 30.0,
        "expiry {expiry} s, {left} s left"
    );

    // The acknowledgement and the reading come back through the bridge: the command is
    // delivered, then converged, and the twin holds the setpoint.
    eventually("the command converges", async || {
        let t = twin("reefer-7").await;
        t["desired"].as_object().is_some_and(|d| d.is_empty())
            && t["delta"] == serde_json::json!([])
    })
    .await;
    // Its events: issued, then (if the acknowledgement was applied before the reading)
    // delivered, then converged.
    let states: Vec<String> = read_all(&p.bootstrap, &p.topology.topics.command_events.name, &[])
        .iter()
        .map(|m| {
            let e = twinflow::codec::command_event_json(m.payload().unwrap()).unwrap();
            assert_eq!(e["command_id"], command_id.as_str());
            e["state"].as_str().unwrap().to_owned()
        })
        .collect();
    assert!(
        states == ["ISSUED", "CONVERGED"] || states == ["ISSUED", "DELIVERED", "CONVERGED"],
        "{states:?}"
    );
    let acks = read_all(&p.bootstrap, &p.topology.topics.acks.name, &[]);
    assert_eq!(acks.len(), 1, "the device's acknowledgement, once");
    assert_eq!(acks[0].key(), Some(&b"reefer-7"[..]));
    let ack: serde_json::Value = serde_json::from_slice(acks[0].payload().unwrap()).unwrap();
    assert_eq!(ack["command_id"], command_id.as_str());
    bridge.stop().await;
    p.stop().await;
}

/// `devices` devices with `per_device` readings each, as JSON, interleaved device by device;
/// and the same readings in Avro, for the oracle.
fn fleet(
    topology: &Topology,
    devices: usize,
    per_device: usize,
) -> (Vec<(String, Vec<u8>)>, Vec<(Vec<u8>, Vec<u8>)>) {
    let t = 1_800_000_000_000_i64;
    let (mut json, mut avro) = (Vec::new(), Vec::new());
    let mut r = twinflow::twin::Reading::default();
    for i in 0..per_device {
        for d in 0..devices {
            let asset = format!("veh-{d:04}");
            let x = (i * 7 + d * 13) % 100;
            let payload = reading(
                t + i as i64 * 1000,
                &[
                    ("speed_kmh", (x as f64 * 1.5).into()),
                    ("temperature_c", (x as f64 / 10.0).into()),
                    ("battery_pct", ((100 - x) as i64).into()),
                ],
            );
            let mut p = payload.clone();
            p.pop();
            p.extend_from_slice(format!(",\"asset_id\":\"{asset}\"}}").as_bytes());
            topology
                .codec
                .decode_reading(twinflow::codec::Format::Json, &p, &mut r)
                .unwrap();
            let mut bytes = Vec::new();
            topology.codec.encode_reading(&r, &mut bytes);
            avro.push((asset.clone().into_bytes(), bytes));
            json.push((telemetry(&asset), payload));
        }
    }
    (json, avro)
}

/// Every (key, value) of `topic`, with how often each is there.
fn held(bootstrap: &str, topic: &str) -> HashMap<(Vec<u8>, Vec<u8>), usize> {
    let mut held = HashMap::new();
    for m in read_all(bootstrap, topic, &[]) {
        let k = (m.key().unwrap().to_vec(), m.payload().unwrap().to_vec());
        *held.entry(k).or_default() += 1;
    }
    held
}

/// Waits until the telemetry topic holds every reading of `sent` (120 s at most); returns
/// how often each is there.
async fn wait_held(
    p: &TestPipeline,
    sent: &[(Vec<u8>, Vec<u8>)],
) -> HashMap<(Vec<u8>, Vec<u8>), usize> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (bootstrap, topic) = (
            p.bootstrap.clone(),
            p.topology.topics.telemetry.name.clone(),
        );
        let held = tokio::task::spawn_blocking(move || held(&bootstrap, &topic))
            .await
            .unwrap();
        let missing = sent.iter().filter(|r| !held.contains_key(*r)).count();
        if missing == 0 {
            return held;
        }
        assert!(
            Instant::now() < deadline,
            "{missing} of {} readings never reached the telemetry topic",
            sent.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Runs the pipeline over the telemetry topic and checks that every twin equals the one
/// the readings sent, processed once in order, make.
async fn assert_twins_equal_the_oracle(
    p: &mut TestPipeline,
    sent: &[(Vec<u8>, Vec<u8>)],
    held: usize,
) {
    let topology = Arc::new(Topology::load(&p.topology_paths).unwrap());
    let pairs: Vec<(&[u8], &[u8])> = sent.iter().map(|(k, v)| (&k[..], &v[..])).collect();
    let oracle = processed_once(&topology, &pairs, p.now());
    p.start();
    p.wait_consumed(held as u64).await;
    let changelog = read_all(&p.bootstrap, &p.topology.topics.changelog.name, &[]);
    let mut last = BTreeMap::new();
    for m in &changelog {
        let twin = topology.codec.decode_twin(m.payload().unwrap()).unwrap();
        last.insert(twin.asset_id.clone(), twin);
    }
    assert_eq!(last.len(), oracle.twins.len(), "a twin per device");
    for (id, want) in &oracle.twins {
        let got = &last[id];
        assert_eq!(
            got.props, want.props,
            "{id}: every property as the oracle has it"
        );
        assert_eq!(got.event_time, want.event_time, "{id}");
        let codes =
            |t: &twinflow::twin::Twin| t.alerts.iter().map(|a| a.code.clone()).collect::<Vec<_>>();
        assert_eq!(codes(got), codes(want), "{id}: the raised alerts");
    }
    p.stop().await;
}

/// A `twinflow bridge` process.
fn spawn_bridge(config: &std::path::Path, log: &std::path::Path) -> std::process::Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    std::process::Command::new(env!("CARGO_BIN_EXE_twinflow"))
        .args(["bridge", "--config"])
        .arg(config)
        .current_dir(common::root())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("twinflow bridge starts")
}

/// The telemetry topic's records so far (the sum of its partitions' ends).
fn telemetry_end(p: &TestPipeline) -> i64 {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &p.bootstrap)
        .create()
        .unwrap();
    let topic = &p.topology.topics.telemetry;
    (0..topic.partitions)
        .map(|part| {
            consumer
                .fetch_watermarks(&topic.name, part, Duration::from_secs(10))
                .unwrap()
                .1
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_kills_of_the_bridge_during_fifty_thousand_publishes_lose_no_reading() {
    const KILLS: usize = 5;
    let (_kafka, mut p) = on_embedded(common::untimed_vehicle_topology());
    let mqtt = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let http = free_port();
    let config = bridge_config(
        dir.path(),
        &p.bootstrap,
        mqtt.port,
        http,
        "client_id = \"crash-bridge\"",
    );
    let log = dir.path().join("bridge.log");
    let (messages, sent) = fleet(&p.topology, 250, 200);
    assert_eq!(messages.len(), 50_000);

    let mut bridge = spawn_bridge(&config, &log);
    // Devices publish once it is subscribed (its session then keeps what comes while it
    // is down).
    eventually("the bridge process subscribes", async || {
        common::http_get(http, "/healthz").is_some_and(|(status, _)| status == 200)
    })
    .await;
    let port = mqtt.port;
    let publisher = tokio::spawn(published(port, messages, 25, "crash"));
    // Kill it each time another seventh of the readings has reached Kafka, and start it
    // again at once, with the same client id (its session, with what it had not
    // acknowledged, waits at the broker).
    for k in 1..=KILLS {
        let target = (k * sent.len() / (KILLS + 2)) as i64;
        let deadline = Instant::now() + Duration::from_secs(120);
        while telemetry_end(&p) < target {
            assert!(
                Instant::now() < deadline,
                "the bridge stalled before kill {k}: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        bridge.kill().unwrap();
        bridge.wait().unwrap();
        bridge = spawn_bridge(&config, &log);
    }
    let refused = publisher.await.unwrap();
    assert!(refused.is_empty(), "the broker took every publish");
    let held = wait_held(&p, &sent).await;
    let total: usize = held.values().sum();
    let duplicates = total - sent.len();
    eprintln!(
        "bridge crash test: {} readings sent, {KILLS} kills, {total} records on the telemetry topic ({duplicates} redelivered)",
        sent.len()
    );
    assert_eq!(held.len(), sent.len(), "nothing but the readings sent");
    // A clean stop (SIGTERM) exits 0.
    let term = std::process::Command::new("kill")
        .args(["-TERM", &bridge.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    assert!(
        bridge.wait().unwrap().success(),
        "SIGTERM stops the bridge cleanly"
    );
    assert_twins_equal_the_oracle(&mut p, &sent, total).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_twenty_second_kafka_outage_stops_acknowledgements_and_loses_nothing() {
    const IN_FLIGHT: f64 = 50.0;
    let (kafka, p, mqtt, _dir, bridge) = rig(&format!("max_in_flight = {IN_FLIGHT}")).await;
    let (messages, sent) = fleet(&p.topology, 50, 64);
    let (before, during) = messages.split_at(200);
    let port = mqtt.port;
    assert!(
        published(port, before.to_vec(), 4, "before")
            .await
            .is_empty()
    );
    p.read(
        &p.topology.topics.telemetry.name,
        200,
        Duration::from_secs(30),
    );

    kafka.broker_down(1).unwrap();
    let publisher = tokio::spawn(published(port, during.to_vec(), 4, "during"));
    // Twenty seconds without Kafka: the bridge holds at most its in-flight limit
    // unacknowledged, and the broker queues the rest.
    let (mut most_in_flight, mut most_received) = (0.0_f64, 0.0_f64);
    let outage = Instant::now();
    while outage.elapsed() < Duration::from_secs(20) {
        most_in_flight = most_in_flight.max(bridge.metric("twinflow_ingest_in_flight", &[]));
        most_received = most_received.max(bridge.metric("twinflow_ingest_records_total", &[]));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let refused = publisher.await.unwrap();
    assert!(
        refused.is_empty(),
        "the broker took every publish while Kafka was away"
    );
    assert!(
        most_in_flight > 0.0,
        "the bridge received during the outage"
    );
    assert!(
        most_in_flight <= IN_FLIGHT,
        "at most {IN_FLIGHT} unacknowledged, saw {most_in_flight}"
    );
    assert!(
        most_received <= 200.0 + IN_FLIGHT,
        "the broker sent no more than the bridge could hold: {most_received}"
    );
    eprintln!(
        "bridge outage test: 20 s without Kafka, {} readings published meanwhile, at most {most_in_flight} in flight",
        during.len()
    );
    kafka.broker_up(1).unwrap();
    let held = wait_held(&p, &sent).await;
    assert_eq!(held.len(), messages.len());
    bridge.stop().await;
}

/// Runs `twinflow demo` with `args` for 10 s of 100 assets, and returns once its HTTP
/// endpoint shows `twins` twins (failing when it ends first): the demo's own devices reach
/// their twins through the door `args` names.
fn demo_reaches_twins(args: &[&str], twins: usize) -> String {
    let port = free_port();
    let mut demo = std::process::Command::new(env!("CARGO_BIN_EXE_twinflow"))
        .current_dir(common::root())
        .args([
            "demo",
            "--duration",
            "10s",
            "--assets",
            "100",
            "--rate",
            "500",
        ])
        .args(["--backlog", "5s", "--malformed", "0"])
        .args(["--http", &format!("127.0.0.1:{port}")])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut seen = false;
    while !seen && demo.try_wait().unwrap().is_none() {
        seen = common::http_get(port, "/fleet").is_some_and(|(status, body)| {
            status == 200
                && serde_json::from_str::<serde_json::Value>(&body)
                    .is_ok_and(|f| f["twins"].as_u64() == Some(twins as u64))
        });
        std::thread::sleep(Duration::from_millis(100));
    }
    let metrics = common::http_get(port, "/metrics")
        .map(|(_, m)| m)
        .unwrap_or_default();
    let out = demo.wait_with_output().unwrap();
    let banner = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{banner}");
    assert!(
        seen,
        "the demo's {twins} twins never showed; output:\n{banner}"
    );
    metrics
}

#[test]
fn the_demo_sends_its_devices_through_http_and_through_mqtt() {
    let metrics = demo_reaches_twins(&["--via", "http"], 100);
    assert!(
        metrics.lines().any(|l| l
            .starts_with("twinflow_ingest_records_total{result=\"accepted\",source=\"http\"}")
            && l.rsplit(' ').next() != Some("0")),
        "readings came through POST /ingest"
    );
    let mqtt = Mosquitto::start();
    let url = format!("mqtt://127.0.0.1:{}", mqtt.port);
    demo_reaches_twins(&["--via", "mqtt", "--mqtt", &url], 100);
}

/// A command record (schemas/command.avsc, written by apache-avro) setting
/// `temperature_c` of `asset` to `value`, issued at `t`, never expiring.
fn command_record(id: &str, asset: &str, value: f64, t: i64) -> Vec<u8> {
    use apache_avro::types::Value as AV;
    let schema = apache_avro::Schema::parse_str(twinflow::codec::COMMAND_SCHEMA).unwrap();
    let mut command = apache_avro::types::Record::new(&schema).unwrap();
    command.put("command_id", id);
    command.put("asset_id", asset);
    command.put("desired_version", 1_i64);
    command.put("attempt", 1_i64);
    let values: HashMap<String, AV> = [(
        "temperature_c".to_owned(),
        AV::Union(0, Box::new(AV::Double(value))),
    )]
    .into();
    command.put("values", values);
    command.put("issued_at", AV::TimestampMillis(t));
    command.put("expires_at", AV::Union(0, Box::new(AV::Null)));
    let mut bytes = Vec::new();
    apache_avro::writer::datum::GenericDatumWriter::builder(&schema)
        .build()
        .unwrap()
        .write_value(&mut bytes, command)
        .unwrap();
    bytes
}

/// A broker that speaks only MQTT 3.1.1, as older brokers do: a front on a free port that
/// answers an MQTT 5 CONNECT with 3.1.1's "unacceptable protocol version" and passes any
/// other connection through to `mqtt`.
async fn mqtt_311_only(mqtt_port: u16) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut device, _)) = listener.accept().await {
            tokio::spawn(async move {
                // CONNECT: fixed header, remaining length (1 to 4 bytes), "MQTT", level.
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                let level_at = loop {
                    device.read_exact(&mut byte).await.ok()?;
                    head.push(byte[0]);
                    let length_bytes = head[1..].iter().position(|b| b & 0x80 == 0);
                    if let Some(n) = length_bytes {
                        break 1 + n + 1 + 6;
                    }
                };
                while head.len() <= level_at {
                    device.read_exact(&mut byte).await.ok()?;
                    head.push(byte[0]);
                }
                if head[level_at] == 5 {
                    device.write_all(&[0x20, 0x02, 0x00, 0x01]).await.ok()?;
                    return None;
                }
                let mut broker = tokio::net::TcpStream::connect(("127.0.0.1", mqtt_port))
                    .await
                    .ok()?;
                broker.write_all(&head).await.ok()?;
                tokio::io::copy_bidirectional(&mut device, &mut broker)
                    .await
                    .ok()
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_without_mqtt_5_gets_mqtt_3_1_1_readings_in_and_commands_out() {
    let (_kafka, p) = on_embedded(common::untimed_vehicle_topology());
    let mqtt = Mosquitto::start();
    let front = mqtt_311_only(mqtt.port).await;
    let (_dir, bridge) = InProcess::between(
        &p.bootstrap,
        front,
        "client_id = \"old-broker-bridge\"\n[kafka.consumer]\n\"auto.offset.reset\" = \"earliest\"",
    )
    .await;
    assert!(
        mqtt.log().contains("as old-broker-bridge (p2,"), // mosquitto names 3.1.1 "p2"
        "the bridge fell back to MQTT 3.1.1: {}",
        mqtt.log()
    );

    a_reading_reaches_kafka(&p, mqtt.port, "old-1").await;
    let t = 1_800_000_000_000_i64;

    // A command goes out without message expiry (3.1.1 has none); a device gets it.
    let device = Obeying::start(mqtt.port, "old-1", 1, "old-1", t + 1000);
    let bytes = command_record("c-old", "old-1", 4.0, t);
    p.send_to(
        &p.topology.topics.commands.name,
        Some(b"old-1"),
        Some(&bytes),
    )
    .await;
    let got = device.only_command().await;
    assert_eq!(got["command"]["command_id"], "c-old");
    assert_eq!(got["command"]["values"]["temperature_c"], 4.0);
    assert_eq!(got["expiry"], serde_json::Value::Null);
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_bridge_connects_over_tls_with_a_client_certificate() {
    let (_kafka, p) = on_embedded(common::untimed_vehicle_topology());
    let certs = tempfile::tempdir().unwrap();
    common::mqtt::certificates(certs.path());
    let tls = free_port();
    let c = certs.path().display();
    // Devices on the plain listener; the bridge on one that requires a client certificate
    // signed by the CA.
    let mqtt = Mosquitto::start_with(&format!(
        "per_listener_settings false\nlistener {tls} 127.0.0.1\ncafile {c}/ca.pem\n\
         certfile {c}/server.pem\nkeyfile {c}/server.key\nrequire_certificate true"
    ));
    let dir = tempfile::tempdir().unwrap();
    let config = bridge_config(
        dir.path(),
        &p.bootstrap,
        mqtt.port,
        free_port(),
        &format!(
            "ca_location = \"{c}/ca.pem\"\ncertificate_location = \"{c}/client.pem\"\n\
         key_location = \"{c}/client.key\""
        ),
    );
    let text = std::fs::read_to_string(&config).unwrap().replace(
        &format!("mqtt://127.0.0.1:{}", mqtt.port),
        &format!("mqtts://127.0.0.1:{tls}"),
    );
    std::fs::write(&config, text).unwrap();
    let bridge = InProcess::start(&config).await;
    a_reading_reaches_kafka(&p, mqtt.port, "tls-1").await;
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_bridges_of_one_share_group_split_the_devices_and_lose_nothing() {
    let (_kafka, p, mqtt, _dir, first) = rig("client_id = \"bridge-a\"").await;
    let (_second_dir, second) =
        InProcess::between(&p.bootstrap, mqtt.port, "client_id = \"bridge-b\"").await;
    let (messages, sent) = fleet(&p.topology, 40, 50);
    assert!(published(mqtt.port, messages, 8, "split").await.is_empty());
    let held = wait_held(&p, &sent).await;
    assert_eq!(
        held.values().sum::<usize>(),
        sent.len(),
        "each reading once"
    );
    let accepted = |b: &InProcess| {
        b.metric(
            "twinflow_ingest_records_total",
            &[("source", "mqtt"), ("result", "accepted")],
        )
    };
    let (a, b) = (accepted(&first), accepted(&second));
    assert_eq!(a + b, sent.len() as f64);
    assert!(a > 0.0 && b > 0.0, "both bridges take a share: {a} and {b}");
    first.stop().await;
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn commands_replayed_after_a_restart_never_send_an_older_value_after_a_newer_one() {
    let (_kafka, p) = on_embedded(common::untimed_vehicle_topology());
    let mqtt = Mosquitto::start();
    let t = 1_800_000_000_000_i64;
    // The device's session exists; two commands for one property wait on the topic, as
    // they do for a bridge that published both but died before committing either.
    Obeying::start(mqtt.port, "valve-1", 0, "valve-1", 0).wait();
    let topic = &p.topology.topics.commands.name;
    for (id, value) in [("c-older", 3.0), ("c-newer", 4.0)] {
        let bytes = command_record(id, "valve-1", value, t);
        p.send_to(topic, Some(b"valve-1"), Some(&bytes)).await;
    }
    let (_dir, bridge) = InProcess::between(
        &p.bootstrap,
        mqtt.port,
        "[kafka.consumer]\n\"auto.offset.reset\" = \"earliest\"",
    )
    .await;
    let command = |result| bridge.metric("twinflow_bridge_commands_total", &[("result", result)]);
    eventually("the bridge reads both commands", async || {
        command("published") + command("superseded") == 2.0
    })
    .await;
    assert_eq!(command("superseded"), 1.0, "the older value is not sent");
    let device = Obeying::start(mqtt.port, "valve-1", 1, "valve-1", t + 1000);
    let got = device.only_command().await;
    assert_eq!(got["command"]["command_id"], "c-newer");
    assert_eq!(got["command"]["values"]["temperature_c"], 4.0);
    bridge.stop().await;
}
