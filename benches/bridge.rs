//! The MQTT bridge against a real MQTT broker (mosquitto, started here on loopback), next to
//! the limit measured in the same run: a plain subscriber (mosquitto_sub, the broker's own C
//! client, acknowledging each message as it arrives) draining the same backlog from the
//! same broker.
//!
//! Each measurement gets a fresh broker. A persistent session subscribes first and leaves;
//! `mosquitto_pub -l` then publishes the backlog at QoS 1 (JSON readings of many devices,
//! one topic each), which the broker queues for the session; the subscriber comes back and
//! is timed until it has received (mosquitto_sub) or acknowledged (the bridge: after Kafka's
//! delivery report) every message. The bridge writes to the embedded Kafka-protocol
//! cluster in this process; its receive-to-PUBACK latency is read from its own histogram
//! (`twinflow_ingest_ack_latency_seconds`, interpolated within buckets) and is the latency
//! at saturation: a backlog keeps `max_in_flight` messages waiting.
//!
//! `cargo bench --bench bridge`: 100k messages of 100 devices, three runs, medians.
//! `TWINFLOW_BENCH_MQTT_MESSAGES`, `TWINFLOW_BENCH_MQTT_DEVICES`, `TWINFLOW_BENCH_RUNS`.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/mod.rs"]
mod support;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::mqtt::{Mosquitto, bridge_config};
use common::{free_port, untimed_vehicle_topology};
use support::{env, median};
use tokio_util::sync::CancellationToken;
use twinflow::config::Config;
use twinflow::demo::embedded::EmbeddedKafka;
use twinflow::metrics::BridgeMetrics;
use twinflow::topology::Topology;

const FILTER: &str = "assets/+/telemetry";

/// Publishes `messages` readings of `devices` devices to the broker at QoS 1.
fn preload(port: u16, messages: usize, devices: usize) {
    let per_device = messages / devices;
    let mut children = Vec::new();
    for d in 0..devices {
        let mut child = Command::new("mosquitto_pub")
            .args(["-p", &port.to_string(), "-q", "1", "-V", "mqttv5", "-l"])
            .args(["-i", &format!("bench-device-{d}")])
            .args(["-t", &format!("assets/veh-{d:04}/telemetry")])
            .stdin(Stdio::piped())
            .spawn()
            .expect("mosquitto_pub (bash .ci/setup installs it)");
        let mut stdin = child.stdin.take().unwrap();
        let lines: String = (0..per_device)
            .map(|i| {
                format!(
                    "{{\"event_time\": {}, \"speed_kmh\": {}.5, \"temperature_c\": {}.25, \"battery_pct\": {}}}\n",
                    1_800_000_000_000_i64 + i as i64 * 1000,
                    i % 120,
                    i % 30,
                    100 - i % 100
                )
            })
            .collect();
        stdin.write_all(lines.as_bytes()).unwrap();
        drop(stdin);
        children.push(child);
        if children.len() == 8 {
            for mut c in children.drain(..) {
                assert!(c.wait().unwrap().success(), "mosquitto_pub failed");
            }
        }
    }
    for mut c in children {
        assert!(c.wait().unwrap().success(), "mosquitto_pub failed");
    }
}

/// A `mosquitto_sub` with a persistent session at QoS 1.
fn mosquitto_sub(port: u16) -> Command {
    let mut c = Command::new("mosquitto_sub");
    c.args(["-p", &port.to_string(), "-q", "1", "-V", "mqttv5", "-c"])
        .args(["-i", "bench-plain", "-x", "3600", "-t", FILTER])
        .stdout(Stdio::null());
    c
}

/// Messages per second a plain subscriber drains from a backlog of `n`.
fn plain(n: usize, devices: usize) -> f64 {
    let broker = Mosquitto::start();
    assert!(
        mosquitto_sub(broker.port)
            .arg("-E")
            .status()
            .unwrap()
            .success()
    );
    preload(broker.port, n, devices);
    let started = Instant::now();
    let status = mosquitto_sub(broker.port)
        .args(["-C", &n.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    n as f64 / started.elapsed().as_secs_f64()
}

/// The quantile `q` of a histogram, interpolated within its buckets.
fn quantile(metrics: &BridgeMetrics, name: &str, q: f64) -> f64 {
    let families = metrics.registry().gather();
    let h = families
        .iter()
        .find(|f| f.name() == name)
        .expect("the histogram")
        .get_metric()[0]
        .get_histogram();
    let total = h.get_sample_count() as f64;
    let want = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for b in h.get_bucket() {
        let count = b.cumulative_count() as f64;
        if count >= want {
            let within = (want - below) / (count - below).max(1.0);
            return lower + (b.upper_bound() - lower) * within;
        }
        (lower, below) = (b.upper_bound(), count);
    }
    lower
}

/// Messages per second the bridge drains from a backlog of `n` (each acknowledged after
/// Kafka has it), and its receive-to-PUBACK p50 and p99 in ms.
async fn bridge(n: usize, devices: usize) -> (f64, f64, f64) {
    let topology = Topology::load(&untimed_vehicle_topology()).unwrap();
    let kafka = EmbeddedKafka::start(1).unwrap();
    for spec in topology.topics.all() {
        kafka.create_topic(&spec.name, spec.partitions).unwrap();
    }
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let path = bridge_config(
        dir.path(),
        &kafka.bootstrap_servers(),
        broker.port,
        free_port(),
        "client_id = \"bench-bridge\"",
    );
    let config = Config::load(&path).unwrap();
    let run = |metrics: BridgeMetrics| {
        let stop = CancellationToken::new();
        let (config, s) = (config.clone(), stop.clone());
        let task = tokio::spawn(async move { twinflow::bridge::run(&config, metrics, s).await });
        (stop, task)
    };
    // Make the session and its subscriptions, and leave.
    let metrics = BridgeMetrics::new(prometheus::Registry::new());
    let (stop, task) = run(metrics.clone());
    let port = broker.port;
    while metrics.connected.get() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.cancel();
    task.await.unwrap().unwrap();

    tokio::task::spawn_blocking(move || preload(port, n, devices))
        .await
        .unwrap();
    let metrics = BridgeMetrics::new(prometheus::Registry::new());
    let started = Instant::now();
    let (stop, task) = run(metrics.clone());
    let deadline = Instant::now() + Duration::from_secs(600);
    while (metrics.ack_seconds.get_sample_count() as usize) < n {
        assert!(
            Instant::now() < deadline,
            "the bridge did not drain the backlog"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    let name = "twinflow_ingest_ack_latency_seconds";
    let (p50, p99) = (
        quantile(&metrics, name, 0.5) * 1000.0,
        quantile(&metrics, name, 0.99) * 1000.0,
    );
    stop.cancel();
    task.await.unwrap().unwrap();
    drop(kafka);
    (rate, p50, p99)
}

fn main() {
    let n = env("TWINFLOW_BENCH_MQTT_MESSAGES", 100_000);
    let devices = env("TWINFLOW_BENCH_MQTT_DEVICES", 100).clamp(1, n);
    let runs = env("TWINFLOW_BENCH_RUNS", 3).max(1);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let version = Command::new("mosquitto")
        .arg("-h")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_owned()
        })
        .unwrap_or_default();
    println!(
        "bridge benchmark: {n} QoS 1 readings of {devices} devices queued in {version} on loopback, \
         drained by mosquitto_sub (the limit) and by twinflow bridge (MQTT 5, to the embedded \
         Kafka cluster), alternating, median of {runs} run(s)"
    );
    let (mut plains, mut bridges, mut ratios, mut p50s, mut p99s) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 1..=runs {
        let limit = plain(n, devices);
        let (rate, p50, p99) = rt.block_on(bridge(n, devices));
        println!(
            "  run {run}: mosquitto_sub {limit:.0}/s, bridge {rate:.0}/s ({:.2}), receive → PUBACK p50 {p50:.2} ms, p99 {p99:.2} ms",
            rate / limit
        );
        plains.push(limit);
        bridges.push(rate);
        ratios.push(rate / limit);
        p50s.push(p50);
        p99s.push(p99);
    }
    println!("| figure | twinflow bridge | mosquitto_sub, same run | ratio | target |");
    println!("|---|---:|---:|---:|---:|");
    println!(
        "| drain of a QoS 1 backlog, messages/s | {:.1}k/s | {:.1}k/s | {:.2} | ≥ 0.70 |",
        median(bridges) / 1000.0,
        median(plains) / 1000.0,
        median(ratios)
    );
    println!(
        "| receive → PUBACK at saturation, p50 / p99 | {:.1} / {:.1} ms | | | |",
        median(p50s),
        median(p99s)
    );
}
