//! What the pipeline scenarios share: the broker, topics, a preloading producer, a twinflow
//! instance in this process, and the rdkafka passthrough that is the baseline of the
//! throughput and latency figures.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tokio::runtime::Runtime;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use twinflow::App;
use twinflow::config::{
    Config, Guarantee, HttpConfig, KafkaConfig, ProcessingConfig, StoreConfig, TopologyConfig,
};
use twinflow::kafka::apply_topology;
use twinflow::metrics::Metrics;
use twinflow::topology::Topology;

use crate::common::{self, NOIDA_CLIENT, Noida, threshold_vehicle_topology};

/// Event time of the simulations' first round, and the processing time of written twins.
pub const START_MS: i64 = 1_790_000_000_000;
/// How often the conditions waited for are checked.
pub const POLL: Duration = Duration::from_millis(10);
/// Consumer settings of every instance (as the broker tests use them); the baselines get the
/// same.
pub const CONSUMER: [(&str, &str); 2] =
    [("fetch.wait.max.ms", "10"), ("session.timeout.ms", "6000")];
/// The commit interval of every measurement: twinflow's default, and the passthrough's.
pub const COMMIT_INTERVAL: Duration = Duration::from_millis(100);

/// A generous bound for moving `records` records through the broker.
pub fn timeout_for(records: usize) -> Duration {
    Duration::from_secs(120 + (records / 2_000) as u64)
}

pub fn client(bootstrap: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap)
        .set("socket.nagle.disable", "true");
    for (k, v) in NOIDA_CLIENT {
        c.set(k, v);
    }
    c
}

pub fn create_topics(rt: &Runtime, broker: &Noida, topology: &Topology) {
    let reports = rt
        .block_on(apply_topology(&client(&broker.bootstrap), &topology.topics))
        .expect("the topics are created");
    assert!(
        reports.iter().all(|r| !r.is_mismatch()),
        "the topics are as declared: {reports:?}"
    );
}

/// A fresh broker with the topology's topics and `input` preloaded into `topic`; returns it
/// with the end offset of each partition.
pub fn broker_with(
    rt: &Runtime,
    topology: &Topology,
    topic: &str,
    input: &[(Vec<u8>, Vec<u8>)],
) -> (Noida, Vec<i64>) {
    let broker = Noida::start();
    create_topics(rt, &broker, topology);
    let sender = Sender::new(&broker.bootstrap, topic);
    for (k, v) in input {
        sender.send(k, v, None);
    }
    sender.finish();
    let partitions = topology.topics.telemetry.partitions;
    let ends = end_offsets(&broker.bootstrap, topic, partitions);
    assert_eq!(
        ends.iter().sum::<i64>(),
        input.len() as i64,
        "the broker holds every record once"
    );
    (broker, ends)
}

/// The end offset of each partition of `topic`.
pub fn end_offsets(bootstrap: &str, topic: &str, partitions: i32) -> Vec<i64> {
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

/// The committed offsets of `group` on `topic`, partition by partition (-1: none yet).
pub fn committed(consumer: &BaseConsumer, topic: &str, partitions: i32) -> Vec<i64> {
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let Ok(tpl) = consumer.committed_offsets(tpl, Duration::from_secs(10)) else {
        return vec![-1; partitions as usize];
    };
    (0..partitions)
        .map(|p| match tpl.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => o,
            _ => -1,
        })
        .collect()
}

/// A producer as twinflow's (idempotent, acks=all, lz4) that waits out a full local queue.
pub struct Sender {
    pub producer: ThreadedProducer<DefaultProducerContext>,
    topic: String,
}

impl Sender {
    pub fn new(bootstrap: &str, topic: &str) -> Sender {
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

    /// Sends a record, keyed (and so partitioned) by `key`, or to `partition` if given.
    pub fn send(&self, key: &[u8], value: &[u8], partition: Option<i32>) {
        let mut record = BaseRecord::to(&self.topic).key(key).payload(value);
        if let Some(p) = partition {
            record = record.partition(p);
        }
        loop {
            match self.producer.send(record) {
                Ok(()) => return,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    self.producer.poll(Duration::from_millis(1));
                }
                Err((e, _)) => panic!("producing to {}: {e}", self.topic),
            }
        }
    }

    /// Waits until every record is acknowledged.
    pub fn finish(self) {
        self.producer
            .flush(Duration::from_secs(300))
            .expect("every record is delivered");
    }
}

/// The baseline: an rdkafka program that consumes `from` in group `group` and produces the
/// same bytes to the same partition of `to`, with the semantics of twinflow at-least-once:
/// every `COMMIT_INTERVAL` it waits until what it produced is acknowledged, then commits the
/// consumed positions. It runs until `done` says so for the committed positions.
pub fn passthrough(
    bootstrap: &str,
    group: &str,
    from: &str,
    to: &str,
    mut done: impl FnMut(&TopicPartitionList) -> bool,
) {
    let mut c = client(bootstrap);
    c.set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest");
    for (k, v) in CONSUMER {
        c.set(k, v);
    }
    let consumer: BaseConsumer = c.create().expect("a consumer");
    consumer.subscribe(&[from]).expect("subscribed");
    let sender = Sender::new(bootstrap, to);
    let mut positions = TopicPartitionList::new();
    let mut last_commit = Instant::now();
    loop {
        if let Some(m) = consumer.poll(Duration::from_millis(5)) {
            let m = m.expect("consuming");
            sender.send(
                m.key().unwrap_or_default(),
                m.payload().unwrap_or_default(),
                Some(m.partition()),
            );
            positions
                .set_partition_offset(from, m.partition(), Offset::Offset(m.offset() + 1))
                .or_else(|_| {
                    positions.add_partition_offset(
                        from,
                        m.partition(),
                        Offset::Offset(m.offset() + 1),
                    )
                })
                .expect("a position");
        }
        if last_commit.elapsed() >= COMMIT_INTERVAL && positions.count() > 0 {
            sender
                .producer
                .flush(Duration::from_secs(30))
                .expect("the output is acknowledged");
            consumer
                .commit(&positions, CommitMode::Sync)
                .expect("the positions are committed");
            last_commit = Instant::now();
            if done(&positions) {
                return;
            }
        }
    }
}

/// Whether `positions` of `topic` reached `ends`.
pub fn reached(positions: &TopicPartitionList, topic: &str, ends: &[i64]) -> bool {
    ends.iter().enumerate().all(|(p, end)| {
        *end == 0
            || matches!(
                positions.find_partition(topic, p as i32).map(|e| e.offset()),
                Some(Offset::Offset(o)) if o >= *end
            )
    })
}

/// The benchmark's topology (`threshold_vehicle_topology`) with JSON telemetry: one object
/// per reading with the telemetry schema's field names.
pub fn json_topology() -> TopologyConfig {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    let avro = threshold_vehicle_topology();
    let dir = DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a directory");
        let topics = std::fs::read_to_string(&avro.topics).expect("the topics file");
        let json = topics.replacen("format = \"avro\"", "format = \"json\"", 1);
        assert_ne!(json, topics, "the telemetry topic declares its format");
        std::fs::write(dir.path().join("topics.toml"), json).expect("written");
        dir
    });
    TopologyConfig {
        topics: dir.path().join("topics.toml"),
        model: avro.model,
    }
}

/// CPU seconds (user and system) a process has used so far: this one, or `pid`.
pub fn cpu_seconds(pid: Option<u32>) -> f64 {
    let path = pid.map_or("/proc/self/stat".to_owned(), |p| format!("/proc/{p}/stat"));
    let stat = std::fs::read_to_string(path).expect("the process's stat");
    // The fields after the command name (in parentheses, which may hold spaces): utime and
    // stime are the 12th and 13th, in clock ticks of 1/100 s (Linux's USER_HZ).
    let rest = &stat[stat.rfind(')').expect("a command name") + 2..];
    let ticks: Vec<f64> = rest
        .split(' ')
        .skip(11)
        .take(2)
        .map(|t| t.parse().expect("clock ticks"))
        .collect();
    (ticks[0] + ticks[1]) / 100.0
}

/// The instance's configuration: defaults, but for the broker workaround and the consumer
/// settings the broker tests use.
pub fn config(bootstrap: &str, group: &str, guarantee: Guarantee, store: &Path) -> Config {
    Config {
        kafka: KafkaConfig {
            bootstrap_servers: bootstrap.to_owned(),
            group_id: group.to_owned(),
            librdkafka: owned(&NOIDA_CLIENT),
            consumer: owned(&CONSUMER),
            producer: BTreeMap::new(),
        },
        topology: threshold_vehicle_topology(),
        store: StoreConfig {
            path: store.join("store"),
        },
        processing: ProcessingConfig {
            guarantee,
            commit_interval: COMMIT_INTERVAL,
            ..ProcessingConfig::default()
        },
        http: HttpConfig {
            listen: ([127, 0, 0, 1], 0).into(),
            ..HttpConfig::default()
        },
        schema_registry: None,
        ingest: Default::default(),
        // TWINFLOW_BENCH_VIEW=off: a processing-only instance (`[view] enabled = false`).
        view: twinflow::config::ViewConfig {
            enabled: std::env::var("TWINFLOW_BENCH_VIEW").map_or(true, |v| v != "off"),
            ..Default::default()
        },
    }
}

fn owned(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A twinflow instance running on the benchmark's runtime.
pub struct Instance {
    pub metrics: Metrics,
    pub http: std::net::SocketAddr,
    stop: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Instance {
    pub fn start(rt: &Runtime, config: &Config) -> Instance {
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
    pub fn wait_until(
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

    /// Polls `GET /readyz` until it answers 200, as an orchestrator's readiness probe would.
    pub fn wait_ready(&mut self, rt: &Runtime, client: &reqwest::Client, timeout: Duration) {
        let url = format!("http://{}/readyz", self.http);
        let deadline = Instant::now() + timeout;
        loop {
            let ready = rt.block_on(client.get(&url).send());
            if ready.is_ok_and(|r| r.status().is_success()) {
                return;
            }
            if self.task.is_finished() {
                let outcome = rt.block_on(&mut self.task);
                panic!("the instance stopped before it was ready: {outcome:?}");
            }
            assert!(Instant::now() < deadline, "not ready within {timeout:?}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Stops the instance cleanly and waits for it.
    pub fn stop(self, rt: &Runtime) {
        self.stop.cancel();
        rt.block_on(self.task)
            .expect("the instance's task completes")
            .expect("the instance stops cleanly");
    }
}

/// The value of each partition's series of a per-partition gauge family.
pub fn partition_gauges(metrics: &Metrics, name: &str) -> BTreeMap<i32, f64> {
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

/// Whether the instance's committed input positions reached `ends`.
pub fn caught_up(metrics: &Metrics, ends: &[i64]) -> bool {
    let positions = partition_gauges(metrics, "twinflow_input_next_offset");
    ends.iter().enumerate().all(|(p, end)| {
        *end == 0
            || positions
                .get(&(p as i32))
                .is_some_and(|next| *next as i64 >= *end)
    })
}

/// The installed broker's version, from its Python package metadata.
pub fn noida_version() -> String {
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
