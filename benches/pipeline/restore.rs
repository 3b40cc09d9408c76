//! Scenario 4: restoring twins from the changelog into an empty store, and starting again
//! on an intact store; with the twin API's latency on the restored fleet.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::Message;
use rdkafka::error::KafkaError;
use tokio::runtime::Runtime;
use twinflow::codec::Format;
use twinflow::config::Guarantee;
use twinflow::demo::sim::{Fleet, FleetConfig};
use twinflow::topology::Topology;
use twinflow::twin::{Reading, Twin};

use crate::common::{self, NOIDA_CLIENT, Noida};
use crate::harness::{
    self, CONSUMER, Instance, POLL, START_MS, Sender, create_topics, end_offsets, partition_gauges,
    timeout_for,
};
use crate::support::median;

/// One run of the restore measurement.
pub struct Restore {
    /// Changelog bytes (values) written.
    pub bytes: usize,
    /// Records/s of the plain consumer.
    pub baseline: f64,
    /// Twins restored per second, from the instance's start until it was ready.
    pub ready: f64,
    /// Twins restored per second of the longest partition restore.
    pub phase: f64,
    /// Seconds from start until every partition was assigned.
    pub assigned: f64,
    /// The twin API on the restored fleet.
    pub api: Api,
    /// Seconds from a restart on the intact store until `GET /readyz` answered 200.
    pub intact_ready: f64,
    /// Seconds of that from the restart until every partition was assigned (the group join).
    pub intact_assigned: f64,
}

/// Latencies of the twin API, in milliseconds: `[p50, p99, p99.9]`.
pub struct Api {
    /// Seconds from the instance's start until its fleet view held every twin.
    pub view_full: f64,
    /// `GET /twins/{id}` of random assets.
    pub twin: [f64; 3],
    /// `GET /healthz` on the same connection: the HTTP stack alone (baseline).
    pub health: [f64; 3],
    /// `GET /twins/{id}/history?limit=1000` of twins with 1000 versions, either order.
    pub history: [f64; 3],
}

/// Twins given [`HISTORY_VERSIONS`] versions each for the history pages.
const DEEP_TWINS: usize = 10;
/// Versions of each of them: one full page.
const HISTORY_VERSIONS: usize = 1000;

/// Readings that give each of [`DEEP_TWINS`] twins [`HISTORY_VERSIONS`] versions, sent to
/// the telemetry topic while the instance runs; their ids.
fn deep_history(bootstrap: &str, topology: &Topology) -> Vec<String> {
    let sender = Sender::new(bootstrap, &topology.topics.telemetry.name);
    let speed = topology
        .model
        .property("speed_kmh")
        .expect("the vehicle model");
    let ids: Vec<String> = (0..DEEP_TWINS).map(|i| format!("deep-{i}")).collect();
    let mut value = Vec::new();
    for v in 0..HISTORY_VERSIONS {
        for id in &ids {
            let reading = Reading {
                asset_id: id.clone(),
                event_time: START_MS + v as i64 * 1000,
                values: vec![(speed, twinflow::twin::Value::Double((v % 100) as f64 + 0.5))],
            };
            value.clear();
            topology.codec.encode_reading(&reading, &mut value);
            sender.send(id.as_bytes(), &value, None);
        }
    }
    sender.finish();
    ids
}

/// Sequential requests on one keep-alive connection, once the fleet view holds every twin.
fn measure_api(
    rt: &Runtime,
    instance: &Instance,
    ids: &[String],
    (bootstrap, topology): (&str, &Topology),
    started: Instant,
) -> Api {
    let twins = ids.len();
    // The simulator repeats a few readings (duplicates), so some assets come twice.
    let distinct = ids.iter().collect::<std::collections::HashSet<_>>().len();
    let base = format!("http://{}", instance.http);
    rt.block_on(async {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + timeout_for(twins);
        loop {
            let fleet: serde_json::Value = client
                .get(format!("{base}/fleet"))
                .send()
                .await
                .expect("GET /fleet")
                .json()
                .await
                .expect("fleet JSON");
            if fleet["twins"].as_u64() == Some(distinct as u64) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the fleet view did not fill: {fleet}"
            );
            tokio::time::sleep(POLL).await;
        }
        let view_full = started.elapsed().as_secs_f64();
        let requests = (twins / 100).clamp(200, 20_000);
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(7);
        let time = async |path: String| {
            let t = Instant::now();
            let r = client
                .get(format!("{base}{path}"))
                .send()
                .await
                .expect("GET");
            assert!(r.status().is_success(), "{path}: {}", r.status());
            r.bytes().await.expect("body");
            t.elapsed().as_secs_f64() * 1000.0
        };
        let mut twin = Vec::with_capacity(requests);
        let mut health = Vec::with_capacity(requests);
        for _ in 0..requests {
            let id = &ids[rand::Rng::gen_range(&mut rng, 0..twins)];
            twin.push(time(format!("/twins/{id}")).await);
            health.push(time("/healthz".to_owned()).await);
        }
        // Pages of 1000 versions, once the view holds them all.
        let deep = deep_history(bootstrap, topology);
        for id in &deep {
            let deadline = Instant::now() + timeout_for(HISTORY_VERSIONS * DEEP_TWINS);
            loop {
                let t: serde_json::Value = client
                    .get(format!("{base}/twins/{id}"))
                    .send()
                    .await
                    .expect("GET /twins/{id}")
                    .json()
                    .await
                    .unwrap_or_default();
                if t["version"].as_u64() >= Some(HISTORY_VERSIONS as u64) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{id} did not reach {HISTORY_VERSIONS} versions"
                );
                tokio::time::sleep(POLL).await;
            }
        }
        let mut history = Vec::with_capacity(200);
        for i in 0..200 {
            let id = &deep[rand::Rng::gen_range(&mut rng, 0..deep.len())];
            let order = if i % 2 == 0 { "asc" } else { "desc" };
            history.push(time(format!("/twins/{id}/history?limit=1000&order={order}")).await);
        }
        Api {
            view_full,
            twin: percentiles(twin),
            health: percentiles(health),
            history: percentiles(history),
        }
    })
}

pub fn percentiles(mut v: Vec<f64>) -> [f64; 3] {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)];
    [at(0.5), at(0.99), at(0.999)]
}

pub fn measure(rt: &Runtime, topology: &Topology, twins: usize, run: usize) -> Restore {
    let broker = Noida::start();
    create_topics(rt, &broker, topology);
    let topic = &topology.topics.changelog.name;
    let partitions = topology.topics.changelog.partitions;
    let (bytes, ids) = write_changelog(&broker.bootstrap, topology, twins);
    let held: i64 = end_offsets(&broker.bootstrap, topic, partitions)
        .iter()
        .sum();
    assert_eq!(held, twins as i64, "the broker holds every twin once");

    let (read, elapsed) = read_whole_topic(&broker.bootstrap, topic, twins);
    let baseline = read as f64 / elapsed.as_secs_f64();

    let store = tempfile::tempdir().expect("a store directory");
    let started = Instant::now();
    let config = harness::config(
        &broker.bootstrap,
        &format!("bench-restore-{run}"),
        Guarantee::AtLeastOnce,
        store.path(),
    );
    let mut instance = Instance::start(rt, &config);
    let mut assigned = None;
    instance.wait_until(rt, "the end of the restore", timeout_for(twins), |m| {
        let all_assigned = m.assigned_partitions.get() == i64::from(partitions);
        if all_assigned && assigned.is_none() {
            assigned = Some(started.elapsed());
        }
        all_assigned
            && m.total("twinflow_restore_records_total") >= twins as u64
            && m.restoring_partitions.get() == 0
    });
    let elapsed = started.elapsed();
    let restored = instance.metrics.total("twinflow_restore_records_total") as f64;
    let longest = partition_gauges(&instance.metrics, "twinflow_restore_duration_seconds")
        .into_values()
        .fold(0.0, f64::max);
    let api = measure_api(rt, &instance, &ids, (&broker.bootstrap, topology), started);
    instance.stop(rt);

    // A restart on the intact store: ready without restoring. (The probe's HTTP client is
    // made first: loading the system's CA certificates takes longer than the restart.)
    let probe = reqwest::Client::new();
    let restarted = Instant::now();
    let mut instance = Instance::start(rt, &config);
    instance.wait_until(rt, "assignment after the restart", timeout_for(0), |m| {
        m.assigned_partitions.get() == i64::from(partitions)
    });
    let intact_assigned = restarted.elapsed().as_secs_f64();
    instance.wait_ready(rt, &probe, timeout_for(twins));
    let intact_ready = restarted.elapsed().as_secs_f64();
    assert_eq!(
        instance.metrics.total("twinflow_restore_records_total"),
        0,
        "an intact store needs no restore"
    );
    instance.stop(rt);
    Restore {
        bytes,
        baseline,
        ready: restored / elapsed.as_secs_f64(),
        phase: restored / longest,
        assigned: assigned.map_or(f64::NAN, |d| d.as_secs_f64()),
        api,
        intact_ready,
        intact_assigned,
    }
}

/// Writes one changelog record per twin as the pipeline would after each asset's first
/// reading; returns the bytes of the values.
/// Returns the bytes written and the asset ids.
fn write_changelog(bootstrap: &str, topology: &Topology, twins: usize) -> (usize, Vec<String>) {
    let simulation = FleetConfig {
        assets: twins,
        seed: 2,
        malformed: 0.0,
        start_ms: START_MS,
        interval_ms: 1000,
    };
    // In its first round the fleet reports every vehicle once, in order.
    let mut fleet = Fleet::new(simulation, &topology).expect("fleet");
    let sender = Sender::new(bootstrap, &topology.topics.changelog.name);
    let (mut key, mut value, mut encoded) = (Vec::new(), Vec::new(), Vec::new());
    let mut reading = Reading::default();
    let mut alerts = Vec::new();
    let mut bytes = 0;
    let mut ids = Vec::with_capacity(twins);
    for _ in 0..twins {
        fleet.next_record(&mut key, &mut value);
        ids.push(String::from_utf8_lossy(&key).into_owned());
        topology
            .codec
            .decode_reading(Format::Avro, &value, &mut reading)
            .expect("the simulator's readings decode");
        let mut twin = Twin::new(&reading.asset_id, &topology.model);
        let change = twin
            .apply(&topology.model, &reading, START_MS)
            .expect("a first reading creates its twin");
        alerts.clear();
        topology.rules.evaluate(&mut twin, &change, &mut alerts);
        encoded.clear();
        topology.codec.encode_twin(&twin, &mut encoded);
        bytes += encoded.len();
        sender.send(&key, &encoded, None);
    }
    sender.finish();
    (bytes, ids)
}

/// Reads every partition of `topic` from the beginning until `expected` records came, with
/// the client settings of a restore reader; returns the records read and the time taken.
fn read_whole_topic(bootstrap: &str, topic: &str, expected: usize) -> (usize, Duration) {
    let mut settings = NOIDA_CLIENT.to_vec();
    settings.extend_from_slice(&CONSUMER);
    settings.extend_from_slice(&[
        ("enable.auto.offset.store", "false"),
        ("enable.partition.eof", "true"),
        ("auto.offset.reset", "earliest"),
    ]);
    let started = Instant::now();
    let (consumer, _) = common::reader(bootstrap, &BTreeMap::new(), topic, &settings);
    let deadline = started + timeout_for(expected);
    let (mut records, mut bytes) = (0, 0);
    while records < expected {
        assert!(
            Instant::now() < deadline,
            "read {records} of {expected} records of {topic}"
        );
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                records += 1;
                bytes += m.payload().map_or(0, <[u8]>::len);
            }
            Some(Err(KafkaError::PartitionEOF(_))) | None => {}
            Some(Err(e)) => panic!("reading {topic}: {e}"),
        }
    }
    let elapsed = started.elapsed();
    std::hint::black_box(bytes);
    (records, elapsed)
}

/// Prints the restore and twin API tables.
pub fn print(restore: &[Restore], topology: &Topology, twins: usize) {
    let changelog = &topology.topics.changelog;
    let twin_bytes = restore[0].bytes / twins.max(1);
    let pick = |f: fn(&Restore) -> f64| median(restore.iter().map(f).collect());
    let base = pick(|r| r.baseline);
    println!();
    println!(
        "4. restore: {twins} twins ({twin_bytes} B avg) in {} ({} partitions), empty store, no input",
        changelog.name, changelog.partitions
    );
    println!(
        "| path                                                  | records/s  | vs baseline | target    | start→assigned |"
    );
    println!(
        "|-------------------------------------------------------|-----------:|------------:|----------:|---------------:|"
    );
    println!(
        "| plain BaseConsumer reads the whole topic (baseline)   | {base:>10.0} |        1.00 |           |              – |"
    );
    println!(
        "| twinflow restore, start → ready                       | {:>10.0} | {:>11.2} | ≥ 200000  | {:>12.2} s |",
        pick(|r| r.ready),
        pick(|r| r.ready / r.baseline),
        pick(|r| r.assigned)
    );
    println!(
        "| twinflow restore phase only (longest partition)       | {:>10.0} | {:>11.2} |           |              – |",
        pick(|r| r.phase),
        pick(|r| r.phase / r.baseline)
    );
    println!(
        "| restart on the intact store, start → GET /readyz 200  | {:>8.2} s |             | < 1 s     | {:>12.2} s |",
        pick(|r| r.intact_ready),
        pick(|r| r.intact_assigned)
    );

    let api =
        |f: fn(&Api) -> [f64; 3], i: usize| median(restore.iter().map(|r| f(&r.api)[i]).collect());
    println!();
    println!(
        "twin API on the restored fleet: {twins} changelog records in the fleet view, sequential requests on one connection, after the view filled ({:.1} s from start)",
        median(restore.iter().map(|r| r.api.view_full).collect())
    );
    println!(
        "| request                                  | p50 ms | p99 ms | p99.9 ms | p99 vs baseline |"
    );
    println!(
        "|------------------------------------------|-------:|-------:|---------:|----------------:|"
    );
    println!(
        "| GET /healthz (baseline: HTTP stack only) | {:>6.3} | {:>6.3} | {:>8.3} |            1.00 |",
        api(|a| a.health, 0),
        api(|a| a.health, 1),
        api(|a| a.health, 2)
    );
    println!(
        "| GET /twins/{{id}}, random of all twins     | {:>6.3} | {:>6.3} | {:>8.3} | {:>15.2} |",
        api(|a| a.twin, 0),
        api(|a| a.twin, 1),
        api(|a| a.twin, 2),
        api(|a| a.twin, 1) / api(|a| a.health, 1)
    );
    println!(
        "| GET /twins/{{id}}/history, 1000 versions   | {:>6.3} | {:>6.3} | {:>8.3} | {:>15.2} |",
        api(|a| a.history, 0),
        api(|a| a.history, 1),
        api(|a| a.history, 2),
        api(|a| a.history, 1) / api(|a| a.health, 1)
    );
    println!("(target for the history page: p99 at most 50 ms)");
}
