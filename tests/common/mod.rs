//! Shared test vocabulary: a pipeline on a real Kafka-protocol broker (the embedded mock
//! cluster, or a noida-db process), readings in, decoded outputs back.
#![allow(dead_code)]

pub mod instance;
pub mod mqtt;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tempfile::TempDir;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use twinflow::App;
use twinflow::clock::{Clock, ManualClock};
use twinflow::config::{
    Config, Guarantee, HttpConfig, KafkaConfig, ProcessingConfig, RegistryConfig, StoreConfig,
    TopologyConfig,
};
use twinflow::metrics::Metrics;
use twinflow::topology::Topology;
use twinflow::twin::{Reading, Twin, Value};

/// `GET path` on `127.0.0.1:port`, HTTP/1.0: the status code and the body (`None` while
/// nothing answers).
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: twinflow\r\n\r\n").ok()?;
    let mut response = String::new();
    s.read_to_string(&mut response).ok()?;
    let status = response.split(' ').nth(1)?.parse().ok()?;
    let body = response.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    Some((status, body))
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn vehicle_topology() -> TopologyConfig {
    TopologyConfig::shipped(&root(), "vehicle")
}

/// The vehicle model without its wall-clock timers (idle, offline): for tests that run the
/// binary on the system clock and compare its outputs with the input processed once, computed in an instant.
pub fn untimed_vehicle_topology() -> TopologyConfig {
    static DIR: std::sync::OnceLock<TempDir> = std::sync::OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let model = std::fs::read_to_string(root().join("topology/vehicle.toml")).unwrap();
        let schemas = format!("\"{}/", root().join("schemas").display());
        let untimed: String = model
            .lines()
            .filter(|l| !l.starts_with("idle_after") && !l.starts_with("offline_after"))
            .map(|l| l.replace("\"../schemas/", &schemas) + "\n")
            .collect();
        std::fs::write(dir.path().join("vehicle.toml"), untimed).unwrap();
        dir
    });
    TopologyConfig {
        topics: root().join("topology/topics.toml"),
        model: dir.path().join("vehicle.toml"),
    }
}

/// The vehicle model without its forecast rules (and the shipped topics beside it): the
/// twin logic the benchmark's Quix Streams peer runs too.
#[allow(dead_code)] // for the benchmarks
pub fn threshold_vehicle_topology() -> TopologyConfig {
    static DIR: std::sync::OnceLock<TempDir> = std::sync::OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let text = std::fs::read_to_string(root().join("topology/vehicle.toml")).unwrap();
        let mut model: toml::Table = toml::from_str(&text).unwrap();
        for schema in ["telemetry_schema", "twin_schema"] {
            let relative = model[schema].as_str().unwrap().to_owned();
            let absolute = root().join("topology").join(relative);
            model.insert(schema.into(), absolute.display().to_string().into());
        }
        let rules = model["rules"].as_array_mut().unwrap();
        rules.retain(|r| r.get("kind").and_then(|k| k.as_str()) != Some("forecast"));
        std::fs::write(
            dir.path().join("vehicle.toml"),
            toml::to_string(&model).unwrap(),
        )
        .unwrap();
        std::fs::copy(
            root().join("topology/topics.toml"),
            dir.path().join("topics.toml"),
        )
        .unwrap();
        dir
    });
    TopologyConfig {
        topics: dir.path().join("topics.toml"),
        model: dir.path().join("vehicle.toml"),
    }
}

/// The vehicle model with its forecast rule (LOW_BATTERY_PREDICTED) on the spans of a real
/// fleet: a 15-minute window, a 40-minute horizon.
#[allow(dead_code)] // not every test forecasts
pub fn fleet_forecast_topology() -> TopologyConfig {
    static DIR: std::sync::OnceLock<TempDir> = std::sync::OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let model = std::fs::read_to_string(root().join("topology/vehicle.toml")).unwrap();
        let schemas = format!("\"{}/", root().join("schemas").display());
        let model = (model.replace("\"../schemas/", &schemas))
            .replace("horizon = \"3m\"", "horizon = \"40m\"")
            .replace("window = \"1m\"", "window = \"15m\"");
        std::fs::write(dir.path().join("vehicle.toml"), model).unwrap();
        dir
    });
    TopologyConfig {
        topics: root().join("topology/topics.toml"),
        model: dir.path().join("vehicle.toml"),
    }
}

/// A configuration file in `dir` for the binary's commands (`export`, `backtest`): the
/// brokers at `bootstrap`, the `topology`, a store in `dir`.
#[allow(dead_code)] // for the tests that run the binary
pub fn config_file(dir: &Path, bootstrap: &str, topology: &TopologyConfig) -> PathBuf {
    let config = dir.join("twinflow.toml");
    std::fs::write(
        &config,
        format!(
            "[kafka]\nbootstrap_servers = \"{bootstrap}\"\n[topology]\ntopics = \"{}\"\nmodel = \"{}\"\n[store]\npath = \"{}\"\n",
            topology.topics.display(),
            topology.model.display(),
            dir.join("store").display(),
        ),
    )
    .unwrap();
    config
}

/// An embedded cluster with the topology's topics, and a stopped pipeline on it.
pub fn on_embedded(
    topology: TopologyConfig,
) -> (twinflow::demo::embedded::EmbeddedKafka, TestPipeline) {
    let kafka = twinflow::demo::embedded::EmbeddedKafka::start(1).unwrap();
    let p = TestPipeline::new(&kafka.bootstrap_servers(), topology, &[]);
    for spec in p.topology.topics.all() {
        kafka.create_topic(&spec.name, spec.partitions).unwrap();
    }
    (kafka, p)
}

/// Waits (30 s at most) until the instance's `GET /fleet` satisfies `check`.
pub async fn wait_fleet(p: &TestPipeline, check: impl Fn(&serde_json::Value) -> bool) {
    let url = format!("http://{}/fleet", p.http.expect("started"));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let fleet: serde_json::Value = reqwest::get(&url).await.unwrap().json().await.unwrap();
        if check(&fleet) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "GET /fleet never satisfied the check: {fleet}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A running (or stopped) twinflow instance with its own store directory.
pub struct TestPipeline {
    pub bootstrap: String,
    pub topology: Topology,
    pub topology_paths: TopologyConfig,
    pub state: TempDir,
    pub clock: ManualClock,
    pub group: String,
    pub extra: BTreeMap<String, String>,
    pub guarantee: Guarantee,
    pub metrics: Option<Metrics>,
    pub http: Option<std::net::SocketAddr>,
    pub registry: Option<RegistryConfig>,
    pub token: Option<twinflow::config::Secret>,
    /// Write credentials, name to token.
    pub writers: BTreeMap<String, twinflow::config::Secret>,
    pub desired_writes_per_minute: u32,
    pub ingest_readings_per_minute: u32,
    /// The fleet view's history settings.
    pub view: twinflow::config::ViewConfig,
    /// The fleet page's tile URL template; `None`: the default.
    pub map_tiles: Option<String>,
    running: Option<(CancellationToken, JoinHandle<anyhow::Result<()>>)>,
    producer: FutureProducer,
}

impl TestPipeline {
    /// A stopped pipeline on `bootstrap` with the given topology; `extra` librdkafka
    /// properties go to every client.
    pub fn new(bootstrap: &str, topology_paths: TopologyConfig, extra: &[(&str, &str)]) -> Self {
        let topology = Topology::load(&topology_paths).expect("topology loads");
        let extra: BTreeMap<String, String> = extra
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut pc = ClientConfig::new();
        pc.set("bootstrap.servers", bootstrap).set("linger.ms", "0");
        for (k, v) in &extra {
            pc.set(k, v);
        }
        TestPipeline {
            bootstrap: bootstrap.into(),
            topology,
            topology_paths,
            state: tempfile::tempdir().unwrap(),
            clock: ManualClock::at(1_800_000_000_000),
            group: format!("twinflow-test-{}", std::process::id()),
            extra,
            guarantee: Guarantee::AtLeastOnce,
            metrics: None,
            http: None,
            registry: None,
            token: None,
            writers: BTreeMap::new(),
            desired_writes_per_minute: HttpConfig::default().desired_writes_per_minute,
            ingest_readings_per_minute: HttpConfig::default().ingest_readings_per_minute,
            view: Default::default(),
            map_tiles: None,
            running: None,
            producer: pc.create().unwrap(),
        }
    }

    pub fn config(&self) -> Config {
        let mut consumer = BTreeMap::new();
        consumer.insert("fetch.wait.max.ms".into(), "10".into());
        consumer.insert("session.timeout.ms".into(), "6000".into());
        Config {
            kafka: KafkaConfig {
                bootstrap_servers: self.bootstrap.clone(),
                group_id: self.group.clone(),
                librdkafka: self.extra.clone(),
                consumer,
                producer: BTreeMap::from([("linger.ms".into(), "1".into())]),
            },
            topology: self.topology_paths.clone(),
            store: StoreConfig {
                path: self.state.path().join("store"),
            },
            processing: ProcessingConfig {
                guarantee: self.guarantee,
                batch_max_records: 500,
                // Timers fire soon after the test moves the clock past their deadline.
                timer_interval: Duration::from_millis(20),
                ..ProcessingConfig::default()
            },
            http: HttpConfig {
                listen: "127.0.0.1:0".parse().unwrap(),
                token: self.token.clone(),
                writers: self.writers.clone(),
                desired_writes_per_minute: self.desired_writes_per_minute,
                ingest_readings_per_minute: self.ingest_readings_per_minute,
                map_tiles: (self.map_tiles.clone())
                    .unwrap_or_else(|| HttpConfig::default().map_tiles),
                ..HttpConfig::default()
            },
            schema_registry: self.registry.clone(),
            ingest: Default::default(),
            view: self.view.clone(),
        }
    }

    /// Starts the instance.
    pub fn start(&mut self) {
        assert!(self.running.is_none(), "already running");
        let app = App::build_with_clock(&self.config(), Arc::new(self.clock.clone()))
            .expect("app builds");
        self.metrics = Some(app.metrics());
        self.http = Some(app.http_addr());
        let stop = CancellationToken::new();
        let task = tokio::spawn(app.run(stop.clone()));
        self.running = Some((stop, task));
    }

    /// Stops the instance cleanly and waits for it.
    pub async fn stop(&mut self) {
        let (stop, task) = self.running.take().expect("running");
        stop.cancel();
        task.await.unwrap().expect("clean stop");
    }

    /// Sends raw bytes to the telemetry topic.
    pub async fn send_raw(&self, key: Option<&[u8]>, payload: Option<&[u8]>) {
        self.send_to(&self.topology.topics.telemetry.name, key, payload)
            .await;
    }

    /// Sends a record to `topic`, keyed like a reading (the same partitioner).
    pub async fn send_to(&self, topic: &str, key: Option<&[u8]>, payload: Option<&[u8]>) {
        let mut r: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic);
        if let Some(k) = key {
            r = r.key(k);
        }
        if let Some(p) = payload {
            r = r.payload(p);
        }
        self.producer
            .send(r, Duration::from_secs(10))
            .await
            .expect("delivered");
    }

    /// Sends a reading, keyed by its asset id. `values` are `(property name, value)`.
    pub async fn send(&self, asset: &str, event_time: i64, values: &[(&str, f64)]) {
        let bytes = self.encode(asset, event_time, values);
        self.send_raw(Some(asset.as_bytes()), Some(&bytes)).await;
    }

    pub fn encode(&self, asset: &str, event_time: i64, values: &[(&str, f64)]) -> Vec<u8> {
        let codec = &self.topology.codec;
        let mut reading = Reading {
            asset_id: asset.into(),
            event_time,
            values: Vec::new(),
        };
        for (name, v) in values {
            let i = self
                .topology
                .model
                .property(name)
                .unwrap_or_else(|| panic!("no property {name}"));
            reading.values.push((i, Value::Double(*v)));
        }
        reading.values.sort_by_key(|(i, _)| *i);
        let mut bytes = Vec::new();
        codec.encode_reading(&reading, &mut bytes);
        bytes
    }

    pub fn metrics(&self) -> &Metrics {
        self.metrics.as_ref().expect("started once")
    }

    /// Reads `n` records of `topic` from the beginning, failing after `timeout`.
    pub fn read(&self, topic: &str, n: usize, timeout: Duration) -> Vec<OwnedMessage> {
        read_topic(&self.bootstrap, &self.extra, topic, n, timeout)
    }

    /// The changelog, decoded, in partition/offset order.
    pub fn changelog(&self, n: usize) -> Vec<Twin> {
        let topic = &self.topology.topics.changelog.name;
        self.read(topic, n, Duration::from_secs(30))
            .iter()
            .map(|m| {
                let twin = self
                    .topology
                    .codec
                    .decode_twin(m.payload().unwrap())
                    .expect("changelog decodes");
                assert_eq!(
                    m.key(),
                    Some(twin.asset_id.as_bytes()),
                    "changelog key is the asset id"
                );
                twin
            })
            .collect()
    }

    /// The alert topic, decoded with apache-avro against schemas/alert_event.avsc.
    pub fn alerts(&self, n: usize) -> Vec<BTreeMap<String, apache_avro::types::Value>> {
        let schema = apache_avro::Schema::parse_str(twinflow::codec::ALERT_SCHEMA).unwrap();
        let topic = &self.topology.topics.alerts.name;
        self.read(topic, n, Duration::from_secs(30))
            .iter()
            .map(|m| {
                let v = avro_read(&schema, m.payload().unwrap());
                let apache_avro::types::Value::Record(fields) = v else {
                    panic!("alert is a record")
                };
                fields.into_iter().collect()
            })
            .collect()
    }

    /// Waits (polling the instance's own metrics) until it has consumed `n` records.
    pub async fn wait_consumed(&self, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got = self.metrics().total("twinflow_records_consumed_total");
            if got >= n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "consumed {got} of {n} records in 30 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn now(&self) -> i64 {
        self.clock.now_ms()
    }
}

/// Reads `n` records of `topic` (all partitions, from the beginning) without a group.
pub fn read_topic(
    bootstrap: &str,
    extra: &BTreeMap<String, String>,
    topic: &str,
    n: usize,
    timeout: Duration,
) -> Vec<OwnedMessage> {
    let (consumer, _) = reader(bootstrap, extra, topic, &[]);
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while out.len() < n {
        assert!(
            Instant::now() < deadline,
            "read {} of {n} records of {topic}",
            out.len()
        );
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            out.push(m.unwrap().detach());
        }
    }
    // Anything beyond n that is already there is a test failure too: give it a moment.
    while let Some(m) = consumer.poll(Duration::from_millis(300)) {
        out.push(m.unwrap().detach());
    }
    out.sort_by_key(|m| (m.partition(), m.offset()));
    out
}

/// A group-less consumer assigned to every partition of `topic` from the beginning, with
/// `settings` on top; returns it with the partition count.
pub fn reader(
    bootstrap: &str,
    extra: &BTreeMap<String, String>,
    topic: &str,
    settings: &[(&str, &str)],
) -> (BaseConsumer, usize) {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap)
        .set("enable.auto.commit", "false")
        .set("group.id", "reader")
        .set("fetch.wait.max.ms", "10");
    for (k, v) in extra
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .chain(settings.iter().copied())
    {
        c.set(k, v);
    }
    let consumer: BaseConsumer = c.create().unwrap();
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let partitions = metadata.topics()[0].partitions().len();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p as i32, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    (consumer, partitions)
}

/// Reads the whole of `topic` (`expected` records) with a plain consumer, from a fresh
/// group-less assignment: the baseline of the benchmarks that read a topic. Records/s.
#[allow(dead_code)] // for the benchmarks
pub fn consume_all(bootstrap: &str, topic: &str, expected: usize) -> f64 {
    let settings = [
        ("fetch.wait.max.ms", "10"),
        ("enable.partition.eof", "true"),
    ];
    let started = Instant::now();
    let (consumer, _) = reader(bootstrap, &Default::default(), topic, &settings);
    let (mut records, mut bytes) = (0, 0);
    while records < expected {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "read {records} of {expected}"
        );
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                records += 1;
                bytes += m.payload().map_or(0, <[u8]>::len);
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) | None => {}
            Some(Err(e)) => panic!("reading: {e}"),
        }
    }
    std::hint::black_box(bytes);
    records as f64 / started.elapsed().as_secs_f64()
}

pub fn header<'a>(m: &'a OwnedMessage, key: &str) -> Option<&'a str> {
    m.headers()?
        .iter()
        .find(|h| h.key == key)
        .and_then(|h| std::str::from_utf8(h.value?).ok())
}

pub fn number(v: &apache_avro::types::Value) -> f64 {
    match v {
        apache_avro::types::Value::Double(x) => *x,
        apache_avro::types::Value::Long(x) | apache_avro::types::Value::TimestampMillis(x) => {
            *x as f64
        }
        other => panic!("not a number: {other:?}"),
    }
}

pub fn text(v: &apache_avro::types::Value) -> String {
    match v {
        apache_avro::types::Value::String(s) => s.clone(),
        apache_avro::types::Value::Enum(_, s) => s.clone(),
        other => panic!("not text: {other:?}"),
    }
}

/// Writes a copy of a directory tree (for topologies modified by a test).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// Waits (20 s at most) until something listens on loopback `port`: the broker `what`,
/// whose log is at `log` (shown if it never does).
pub fn wait_listening(port: u16, what: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not listen on port {port} within 20 s: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A noida-db broker process (see the README's test section), on a free loopback port with a
/// fresh data directory; killed on drop.
pub struct Noida {
    child: std::process::Child,
    bin: PathBuf,
    port: u16,
    pub bootstrap: String,
    dir: TempDir,
}

/// librdkafka settings every client talking to noida-db needs: it ignores fetch size limits
/// and may answer with the whole backlog at once.
pub const NOIDA_CLIENT: [(&str, &str); 1] = [("receive.message.max.bytes", "2147483647")];

pub fn venv() -> PathBuf {
    root().join(".venv")
}

impl Noida {
    /// Starts a broker on a free port with a fresh data directory.
    pub fn start() -> Noida {
        let lib = venv().join("lib");
        let bin = std::fs::read_dir(&lib)
            .ok()
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("site-packages/noida_db/noida-db"))
            .find(|p| p.exists())
            .unwrap_or_else(|| {
                panic!(
                    "noida-db is not installed under {}: run `bash .ci/setup`",
                    lib.display()
                )
            });
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Self::spawn(&bin, port, dir.path());
        Noida {
            child,
            bin,
            port,
            bootstrap: format!("127.0.0.1:{port}"),
            dir,
        }
    }

    fn spawn(bin: &Path, port: u16, dir: &Path) -> std::process::Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("broker.log"))
            .unwrap();
        let child = std::process::Command::new(bin)
            .args([
                "start",
                "--only",
                "kafka",
                "--kafka-port",
                &port.to_string(),
            ])
            .arg("--data-dir")
            .arg(dir.join("data"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("noida-db starts");
        wait_listening(port, "noida-db", &dir.join("broker.log"));
        child
    }

    /// Stops the broker cleanly (SIGTERM: it writes its data to disk first).
    pub fn stop(&mut self) {
        let status = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
        self.child.wait().unwrap();
    }

    /// Starts the stopped broker again, on the same port and data.
    pub fn restart(&mut self) {
        // A stopped broker's port stays taken for a few seconds.
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpListener::bind(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "port {} stayed taken", self.port);
            std::thread::sleep(Duration::from_millis(100));
        }
        self.child = Self::spawn(&self.bin, self.port, self.dir.path());
    }
}

impl Drop for Noida {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Decodes an Avro datum with the reference implementation.
pub fn avro_read(schema: &apache_avro::Schema, bytes: &[u8]) -> apache_avro::types::Value {
    apache_avro::reader::datum::GenericDatumReader::builder(schema)
        .build()
        .unwrap()
        .read_value(&mut &bytes[..])
        .expect("decodes with the reference implementation")
}

/// What processing an input once, in order, through the pipeline's own record logic must
/// produce: the expectation the end-to-end tests compare outputs with.
pub struct ProcessedOnce {
    /// The last twin of each asset.
    pub twins: BTreeMap<String, Twin>,
    /// Alert events by `(alert_id, state)`, with how often each occurs.
    pub alerts: BTreeMap<(String, String), usize>,
    /// Number of alert events.
    pub alert_events: usize,
    /// Command events by `(command_id, state)`, with how often each occurs.
    pub command_events: BTreeMap<(String, String), usize>,
    /// Commands sent to devices.
    pub commands: usize,
    /// Number of twin updates (changelog records).
    pub updates: usize,
    /// Number of dead letters.
    pub dead_letters: usize,
    /// Input records that changed nothing.
    pub skips: usize,
}

/// Runs `input` (key, value) through a [`Processor`] at processing time `now`.
pub fn processed_once(
    topology: &Arc<Topology>,
    input: &[(&[u8], &[u8])],
    now: i64,
) -> ProcessedOnce {
    use twinflow::pipeline::{Input, Processor, Target};
    let dir = tempfile::tempdir().unwrap();
    let store = twinflow::store::Store::open(dir.path()).unwrap();
    let mut processor = Processor::new(topology.clone(), store.partition(0), usize::MAX);
    let schema = apache_avro::Schema::parse_str(twinflow::codec::ALERT_SCHEMA).unwrap();
    let mut o = ProcessedOnce {
        twins: BTreeMap::new(),
        alerts: BTreeMap::new(),
        alert_events: 0,
        command_events: BTreeMap::new(),
        commands: 0,
        updates: 0,
        dead_letters: 0,
        skips: 0,
    };
    let mut batch = processor.batch(true);
    for (i, (k, v)) in input.iter().enumerate() {
        let record = Input {
            key: Some(k),
            payload: Some(v),
            topic: &topology.topics.telemetry.name,
            offset: i as i64,
            headers: None,
        };
        processor.process(&record, &mut batch, now).unwrap();
    }
    for out in &batch.outputs.records {
        let (_, payload) = batch.outputs.bytes(out);
        match out.target {
            Target::Changelog => {
                let twin = topology.codec.decode_twin(payload.unwrap()).unwrap();
                o.updates += 1;
                o.twins.insert(twin.asset_id.clone(), twin);
            }
            Target::Alerts => {
                *o.alerts
                    .entry(alert_key(&avro_read(&schema, payload.unwrap())))
                    .or_default() += 1;
                o.alert_events += 1;
            }
            Target::DeadLetter => o.dead_letters += 1,
            Target::Commands => o.commands += 1,
            Target::CommandEvents => {
                let json = twinflow::codec::command_event_json(payload.unwrap()).unwrap();
                *o.command_events.entry(command_key(&json)).or_default() += 1;
            }
        }
    }
    o.skips = input.len() - o.updates - o.dead_letters;
    o
}

/// `(alert_id, state)` of a decoded alert event.
pub fn alert_key(v: &apache_avro::types::Value) -> (String, String) {
    let apache_avro::types::Value::Record(f) = v else {
        panic!("an alert is a record")
    };
    let get = |n: &str| text(&f.iter().find(|(k, _)| k == n).unwrap().1);
    (get("alert_id"), get("state"))
}

/// What the outputs of a run came to, beside what every guarantee promises.
pub struct Seen {
    /// Changelog records.
    pub updates: usize,
    /// `(asset_id, version)` pairs written more than once (identical replays).
    pub duplicate_versions: usize,
    /// Alert events by `(alert_id, state)`, with how often each occurs.
    pub alerts: BTreeMap<(String, String), usize>,
}

/// Blanks the processing times of a twin, which differ between runs by design.
fn without_processing_times(twin: &mut Twin) {
    twin.last_seen = 0;
    twin.updated_at = 0;
    twin.still_since = twin.still_since.map(|_| 0);
    for d in &mut twin.desired {
        d.set_at = 0;
    }
    for c in &mut twin.commands {
        c.issued_at = 0;
        c.expires_at = c.expires_at.map(|_| 0);
    }
}

/// `(command_id, state)` of a command event as JSON.
pub fn command_key(event: &serde_json::Value) -> (String, String) {
    let get = |k: &str| event[k].as_str().unwrap().to_owned();
    (get("command_id"), get("state"))
}

/// Command events by `(command_id, state)`, with how often each occurs; checked to be
/// every transition of the input processed once, and no other.
pub fn assert_command_events(
    expected: &ProcessedOnce,
    events: &[OwnedMessage],
) -> BTreeMap<(String, String), usize> {
    let mut seen = BTreeMap::new();
    for m in events {
        let json = twinflow::codec::command_event_json(m.payload().unwrap()).unwrap();
        *seen.entry(command_key(&json)).or_default() += 1;
    }
    assert_eq!(
        seen.keys().collect::<Vec<_>>(),
        expected.command_events.keys().collect::<Vec<_>>(),
        "every command transition, and no other"
    );
    seen
}

/// Wall-clock now, epoch ms.
pub fn now_ms() -> i64 {
    use twinflow::clock::Clock as _;
    twinflow::clock::SystemClock.now_ms()
}

/// Checks what every guarantee promises: the last changelog twin of every asset equals the
/// input processed once (processing time aside), every alert transition is there and no other, and a
/// version written more than once is an identical replay.
pub fn assert_delivery_invariants(
    topology: &Topology,
    expected: &ProcessedOnce,
    changelog: &[OwnedMessage],
    alerts: &[OwnedMessage],
) -> Seen {
    let mut last: BTreeMap<String, Twin> = BTreeMap::new();
    let mut versions: BTreeMap<(String, i64), Vec<Twin>> = BTreeMap::new();
    for m in changelog {
        let mut twin = topology.codec.decode_twin(m.payload().unwrap()).unwrap();
        without_processing_times(&mut twin);
        versions
            .entry((twin.asset_id.clone(), twin.version))
            .or_default()
            .push(twin.clone());
        last.insert(twin.asset_id.clone(), twin);
    }
    assert_eq!(last.len(), expected.twins.len(), "every twin present");
    for (id, want) in &expected.twins {
        let mut want = want.clone();
        without_processing_times(&mut want);
        assert_eq!(last.get(id), Some(&want), "twin {id}");
    }
    for copies in versions.values() {
        assert!(
            copies.iter().all(|t| *t == copies[0]),
            "a replayed version is identical"
        );
    }
    let schema = apache_avro::Schema::parse_str(twinflow::codec::ALERT_SCHEMA).unwrap();
    let mut seen = BTreeMap::new();
    for m in alerts {
        *seen
            .entry(alert_key(&avro_read(&schema, m.payload().unwrap())))
            .or_default() += 1;
    }
    assert_eq!(
        seen.keys().collect::<Vec<_>>(),
        expected.alerts.keys().collect::<Vec<_>>(),
        "every alert transition, and no other"
    );
    Seen {
        updates: changelog.len(),
        duplicate_versions: versions.values().filter(|v| v.len() > 1).count(),
        alerts: seen,
    }
}
