//! Whole-instance throughput against a real Kafka-protocol broker: a noida-db process, started
//! the way the broker tests start it, with a fresh data directory for every measurement. Each
//! figure comes with a baseline measured in the same run, since absolute numbers on a shared
//! machine say little.
//!
//! 1. **Restore.** The changelog holds one record per twin (distinct asset ids, keyed and
//!    partitioned like the readings that made them, values encoded by the model's codec after
//!    merging the asset's first simulated reading and evaluating the rules, as the processor
//!    does). Baseline: one plain `BaseConsumer` reading the whole changelog topic with the
//!    restore readers' client settings. Then an instance (`App`, in this process) starts with
//!    an empty store and no input, and is timed from start until every partition is assigned
//!    and restored (`twinflow_restore_records_total` reaches the twin count and
//!    `twinflow_restoring_partitions` is back to 0). The records carry no
//!    `twinflow.source.offset` header: with no input there is no position to hold it against,
//!    and every record is applied.
//! 2. **Exactly-once vs at-least-once.** The same simulated readings are preloaded into the
//!    telemetry topic of a fresh broker for each guarantee; an instance with a fresh store and
//!    group is timed from start until its committed position (`twinflow_input_next_offset`)
//!    reaches the end of every partition.
//!
//! Both times include the instance's start-up (clients, group join, assignment and, under
//! exactly-once, `init_transactions`); the time to assignment is printed beside them.
//! Figures are medians over the runs; each ratio is the median of the per-run ratios.
//!
//! `cargo bench --bench pipeline` (full: 1M twins, 500k readings, one run; needs the broker
//! that `bash .ci/setup` installs); `TWINFLOW_BENCH_TWINS=20000 TWINFLOW_BENCH_RECORDS=20000
//! cargo bench --bench pipeline` for a smoke run. `TWINFLOW_BENCH_RUNS` repeats.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{NOIDA_CLIENT, Noida, vehicle_topology};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, Message};
use support::{env, median};
use tokio::runtime::Runtime;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use twinflow::App;
use twinflow::codec::Format;
use twinflow::config::{Config, Guarantee, HttpConfig, KafkaConfig, ProcessingConfig, StoreConfig};
use twinflow::kafka::apply_topology;
use twinflow::metrics::Metrics;
use twinflow::sim::{Fleet, FleetConfig};
use twinflow::topology::Topology;
use twinflow::twin::{Reading, Twin};

/// Vehicles behind the preloaded readings of the throughput measurement.
const ASSETS: usize = 10_000;
/// Event time of the simulations' first round, and the processing time of the written twins.
const START_MS: i64 = 1_790_000_000_000;
/// How often the conditions waited for are checked.
const POLL: Duration = Duration::from_millis(10);
/// Consumer settings of every instance (as the broker tests use them); the baseline reader
/// gets the same.
const CONSUMER: [(&str, &str); 2] = [("fetch.wait.max.ms", "10"), ("session.timeout.ms", "6000")];

/// A generous bound for moving `records` records through the broker.
fn timeout_for(records: usize) -> Duration {
    Duration::from_secs(120 + (records / 2_000) as u64)
}

fn main() {
    let twins = env("TWINFLOW_BENCH_TWINS", 1_000_000);
    let records = env("TWINFLOW_BENCH_RECORDS", 500_000);
    let runs = env("TWINFLOW_BENCH_RUNS", 1).max(1);
    let topology = Arc::new(
        Topology::load(&vehicle_topology().topics, &vehicle_topology().model).expect("topology"),
    );
    let rt = Runtime::new().expect("a Tokio runtime");
    let readings = FleetConfig {
        assets: ASSETS,
        seed: 1,
        malformed: 0.0,
        start_ms: START_MS,
        interval_ms: 1000,
    };
    let input = Fleet::new(readings, &topology.codec)
        .expect("fleet")
        .take(records);
    let input_bytes: usize = input.iter().map(|(_, v)| v.len()).sum();

    let (_, librdkafka) = rdkafka::util::get_rdkafka_version();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "pipeline benchmark: one twinflow instance (App, in process) against a noida-db {} broker process on loopback, \
         a fresh one with a fresh data dir per measurement; librdkafka {librdkafka}, {cores} cores, median of {runs} run(s)",
        noida_version()
    );

    let mut restore = Vec::new();
    let (mut alo, mut eos) = (Vec::new(), Vec::new());
    for run in 0..runs {
        restore.push(measure_restore(&rt, &topology, twins, run));
        alo.push(measure_processing(
            &rt,
            &topology,
            &input,
            Guarantee::AtLeastOnce,
            run,
        ));
        eos.push(measure_processing(
            &rt,
            &topology,
            &input,
            Guarantee::ExactlyOnce,
            run,
        ));
    }

    let changelog = &topology.topics.changelog;
    let twin_bytes = restore[0].bytes / twins.max(1);
    let pick = |f: fn(&Restore) -> f64| median(restore.iter().map(f).collect());
    let base = pick(|r| r.baseline);
    println!();
    println!(
        "restore: {twins} twins ({twin_bytes} B avg) in {} ({} partitions), empty store, no input",
        changelog.name, changelog.partitions
    );
    println!(
        "| path                                                  | records/s  | vs baseline | start→assigned |"
    );
    println!(
        "|-------------------------------------------------------|-----------:|------------:|---------------:|"
    );
    println!(
        "| plain BaseConsumer reads the whole topic (baseline)   | {base:>10.0} |        1.00 |              – |"
    );
    println!(
        "| twinflow restore, start → ready                       | {:>10.0} | {:>11.2} | {:>12.2} s |",
        pick(|r| r.ready),
        pick(|r| r.ready / r.baseline),
        pick(|r| r.assigned)
    );
    println!(
        "| twinflow restore phase only (longest partition)       | {:>10.0} | {:>11.2} |              – |",
        pick(|r| r.phase),
        pick(|r| r.phase / r.baseline)
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

    let telemetry = &topology.topics.telemetry;
    let ratio = median(alo.iter().zip(&eos).map(|(a, e)| e.rate / a.rate).collect());
    println!();
    println!(
        "processing: {records} readings ({} B avg) of {ASSETS} vehicles preloaded in {} ({} partitions), fresh store and group",
        input_bytes / records.max(1),
        telemetry.name,
        telemetry.partitions
    );
    println!("| guarantee                  | events/s   | vs at-least-once | start→assigned |");
    println!("|----------------------------|-----------:|-----------------:|---------------:|");
    println!(
        "| at-least-once (baseline)   | {:>10.0} |             1.00 | {:>12.2} s |",
        median(alo.iter().map(|p| p.rate).collect()),
        median(alo.iter().map(|p| p.assigned).collect())
    );
    println!(
        "| exactly-once               | {:>10.0} | {ratio:>16.2} | {:>12.2} s |",
        median(eos.iter().map(|p| p.rate).collect()),
        median(eos.iter().map(|p| p.assigned).collect())
    );
}

/// One run of the restore measurement.
struct Restore {
    /// Changelog bytes (values) written.
    bytes: usize,
    /// Records/s of the plain consumer.
    baseline: f64,
    /// Twins restored per second, from the instance's start until it was ready.
    ready: f64,
    /// Twins restored per second of the longest partition restore.
    phase: f64,
    /// Seconds from start until every partition was assigned.
    assigned: f64,
    /// The twin API on the restored fleet.
    api: Api,
}

/// Latencies of the twin API, in milliseconds: `[p50, p99, p99.9]`.
struct Api {
    /// Seconds from the instance's start until its fleet view held every twin.
    view_full: f64,
    /// `GET /twins/{id}` of random assets.
    twin: [f64; 3],
    /// `GET /healthz` on the same connection: the HTTP stack alone (baseline).
    health: [f64; 3],
}

/// Sequential requests on one keep-alive connection, once the fleet view holds every twin.
fn measure_api(rt: &Runtime, instance: &Instance, ids: &[String], started: Instant) -> Api {
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
        Api {
            view_full,
            twin: percentiles(twin),
            health: percentiles(health),
        }
    })
}

fn percentiles(mut v: Vec<f64>) -> [f64; 3] {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)];
    [at(0.5), at(0.99), at(0.999)]
}

fn measure_restore(rt: &Runtime, topology: &Topology, twins: usize, run: usize) -> Restore {
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
    let mut instance = Instance::start(
        rt,
        &config(
            &broker.bootstrap,
            &format!("bench-restore-{run}"),
            Guarantee::AtLeastOnce,
            store.path(),
        ),
    );
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
    let api = measure_api(rt, &instance, &ids, started);
    instance.stop(rt);
    Restore {
        bytes,
        baseline,
        ready: restored / elapsed.as_secs_f64(),
        phase: restored / longest,
        assigned: assigned.map_or(f64::NAN, |d| d.as_secs_f64()),
        api,
    }
}

/// One run of one guarantee.
struct Processing {
    /// Input records per second, from start until caught up.
    rate: f64,
    /// Seconds from start until every partition was assigned.
    assigned: f64,
}

fn measure_processing(
    rt: &Runtime,
    topology: &Topology,
    input: &[(Vec<u8>, Vec<u8>)],
    guarantee: Guarantee,
    run: usize,
) -> Processing {
    let broker = Noida::start();
    create_topics(rt, &broker, topology);
    let topic = &topology.topics.telemetry.name;
    let partitions = topology.topics.telemetry.partitions;
    let sender = Sender::new(&broker.bootstrap, topic);
    for (k, v) in input {
        sender.send(k, v);
    }
    sender.finish();
    let ends = end_offsets(&broker.bootstrap, topic, partitions);
    assert_eq!(
        ends.iter().sum::<i64>(),
        input.len() as i64,
        "the broker holds every reading once"
    );

    let store = tempfile::tempdir().expect("a store directory");
    let group = format!("bench-{guarantee:?}-{run}").to_lowercase();
    let started = Instant::now();
    let mut instance = Instance::start(
        rt,
        &config(&broker.bootstrap, &group, guarantee, store.path()),
    );
    let mut assigned = None;
    instance.wait_until(rt, "the end of the input", timeout_for(input.len()), |m| {
        if assigned.is_none() && m.assigned_partitions.get() == i64::from(partitions) {
            assigned = Some(started.elapsed());
        }
        let positions = partition_gauges(m, "twinflow_input_next_offset");
        ends.iter().enumerate().all(|(p, end)| {
            positions
                .get(&(p as i32))
                .is_some_and(|next| *next as i64 >= *end)
        })
    });
    let elapsed = started.elapsed();
    instance.stop(rt);
    Processing {
        rate: input.len() as f64 / elapsed.as_secs_f64(),
        assigned: assigned.map_or(f64::NAN, |d| d.as_secs_f64()),
    }
}

/// The instance's configuration: defaults, but for the broker workaround and the consumer
/// settings the broker tests use.
fn config(bootstrap: &str, group: &str, guarantee: Guarantee, store: &Path) -> Config {
    Config {
        kafka: KafkaConfig {
            bootstrap_servers: bootstrap.to_owned(),
            group_id: group.to_owned(),
            librdkafka: owned(&NOIDA_CLIENT),
            consumer: owned(&CONSUMER),
            producer: BTreeMap::new(),
        },
        topology: vehicle_topology(),
        store: StoreConfig {
            path: store.join("store"),
        },
        processing: ProcessingConfig {
            guarantee,
            ..ProcessingConfig::default()
        },
        http: HttpConfig {
            listen: ([127, 0, 0, 1], 0).into(),
            token: None,
        },
        schema_registry: None,
    }
}

fn owned(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A twinflow instance running on the benchmark's runtime.
struct Instance {
    metrics: Metrics,
    http: std::net::SocketAddr,
    stop: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Instance {
    fn start(rt: &Runtime, config: &Config) -> Instance {
        let _runtime = rt.enter();
        let app = App::build(config).expect("the instance builds");
        let metrics = app.metrics();
        let http = app.http_addr();
        let stop = CancellationToken::new();
        let task = rt.spawn(app.run(stop.clone()));
        Instance {
            metrics,
            http,
            stop,
            task,
        }
    }

    /// Polls `done` on the instance's metrics until it holds; fails if the instance stops
    /// first or `timeout` passes.
    fn wait_until(
        &mut self,
        rt: &Runtime,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&Metrics) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        while !done(&self.metrics) {
            if self.task.is_finished() {
                let outcome = rt.block_on(&mut self.task);
                panic!("the instance stopped before {what}: {outcome:?}");
            }
            assert!(
                Instant::now() < deadline,
                "the instance did not reach {what} within {timeout:?}"
            );
            std::thread::sleep(POLL);
        }
    }

    /// Stops the instance cleanly and waits for it.
    fn stop(self, rt: &Runtime) {
        self.stop.cancel();
        rt.block_on(self.task)
            .expect("the instance's task completes")
            .expect("the instance stops cleanly");
    }
}

/// The value of each partition's series of a per-partition gauge family.
fn partition_gauges(metrics: &Metrics, name: &str) -> BTreeMap<i32, f64> {
    metrics
        .registry()
        .gather()
        .iter()
        .filter(|f| f.name() == name)
        .flat_map(|f| f.get_metric().iter())
        .filter_map(|m| {
            let partition: i32 = m
                .get_label()
                .iter()
                .find(|l| l.name() == "partition")?
                .value()
                .parse()
                .ok()?;
            Some((partition, m.get_gauge().value()))
        })
        .collect()
}

fn client(bootstrap: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap);
    for (k, v) in NOIDA_CLIENT {
        c.set(k, v);
    }
    c
}

fn create_topics(rt: &Runtime, broker: &Noida, topology: &Topology) {
    let reports = rt
        .block_on(apply_topology(&client(&broker.bootstrap), &topology.topics))
        .expect("the topics are created");
    assert!(
        reports.iter().all(|r| !r.is_mismatch()),
        "the topics are as declared: {reports:?}"
    );
}

/// The end offset of each partition of `topic`.
fn end_offsets(bootstrap: &str, topic: &str, partitions: i32) -> Vec<i64> {
    let consumer: BaseConsumer = client(bootstrap).create().expect("a consumer");
    (0..partitions)
        .map(|p| {
            consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .expect("the partition's watermarks")
                .1
        })
        .collect()
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
    let mut fleet = Fleet::new(simulation, &topology.codec).expect("fleet");
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
        sender.send(&key, &encoded);
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

/// A producer as twinflow's (idempotent, acks=all, lz4) that waits out a full local queue.
struct Sender {
    producer: ThreadedProducer<DefaultProducerContext>,
    topic: String,
}

impl Sender {
    fn new(bootstrap: &str, topic: &str) -> Sender {
        let producer = client(bootstrap)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("compression.type", "lz4")
            .create()
            .expect("a producer");
        Sender {
            producer,
            topic: topic.to_owned(),
        }
    }

    fn send(&self, key: &[u8], value: &[u8]) {
        let mut record = BaseRecord::to(&self.topic).key(key).payload(value);
        loop {
            match self.producer.send(record) {
                Ok(()) => return,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    self.producer.poll(Duration::from_millis(5));
                }
                Err((e, _)) => panic!("producing to {}: {e}", self.topic),
            }
        }
    }

    /// Waits until every record is acknowledged.
    fn finish(self) {
        self.producer
            .flush(Duration::from_secs(300))
            .expect("every record is delivered");
    }
}

/// The installed broker's version, from its Python package metadata.
fn noida_version() -> String {
    let lib = common::venv().join("lib");
    std::fs::read_dir(lib)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|python| std::fs::read_dir(python.path().join("site-packages")).ok())
        .flatten()
        .flatten()
        .find_map(|entry| {
            let name = entry.file_name();
            let version = name
                .to_str()?
                .strip_prefix("noida_db-")?
                .strip_suffix(".dist-info")?;
            Some(version.to_owned())
        })
        .unwrap_or_else(|| "(version unknown)".to_owned())
}
