//! The configuration tree: a TOML file plus `TWINFLOW_` environment overrides.
//!
//! `Config` is plain data with defaults; [`Config::load`] parses it, refusing unknown keys
//! with the full key path, and [`Config::validate`] checks the relationships between values
//! before anything starts. Nothing reads configuration by string key at run time.
//!
//! Environment overrides: `TWINFLOW_<SECTION>__<KEY>=value` sets `<section>.<key>`, e.g.
//! `TWINFLOW_KAFKA__BOOTSTRAP_SERVERS=broker:9092`. Under `kafka.librdkafka`, underscores
//! stand for the dots of librdkafka property names:
//! `TWINFLOW_KAFKA__LIBRDKAFKA__SASL_PASSWORD=...` sets `sasl.password`, so secrets need not
//! be written into the file. A name ending in `_FILE` reads the value from that file instead
//! (trailing newline dropped), as container secrets are mounted:
//! `TWINFLOW_KAFKA__LIBRDKAFKA__SASL_PASSWORD_FILE=/run/secrets/kafka_password`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rdkafka::ClientConfig;
use serde::Deserialize;

use crate::error::{Error, Result};

/// The whole configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Kafka connection and client settings.
    pub kafka: KafkaConfig,
    /// Where the topic and model files are.
    #[serde(default)]
    pub topology: TopologyConfig,
    /// The local state store.
    #[serde(default)]
    pub store: StoreConfig,
    /// Guarantees, commits, batching and caching of the processing loop.
    #[serde(default)]
    pub processing: ProcessingConfig,
    /// The HTTP endpoint (metrics, health, twins).
    #[serde(default)]
    pub http: HttpConfig,
    /// The Confluent-compatible schema registry, for topics with `format = "confluent_avro"`.
    pub schema_registry: Option<RegistryConfig>,
    /// Devices that do not speak Kafka: the MQTT bridge (`twinflow bridge`).
    #[serde(default)]
    pub ingest: IngestConfig,
    /// The fleet view every instance keeps for the API.
    #[serde(default)]
    pub view: ViewConfig,
}

/// The fleet view: a replica of the changelog on every instance, for the API.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ViewConfig {
    /// Whether this instance keeps the fleet view. An instance that serves no twin API
    /// (processing only) saves the view's reading of the changelog and its store writes;
    /// its twin API then answers 503, and `/metrics`, `/healthz`, `/readyz` and
    /// `POST /ingest` go on.
    pub enabled: bool,
    /// Versions of each twin kept for `GET /twins/{id}/history` and `?as_of=` (0: none).
    /// A version costs about the twin's encoded size on disk (LZ4 in RocksDB).
    pub history_versions: u64,
    /// Versions older than this (by processing time) are not served; the whole history
    /// stays on the history topic for its retention.
    #[serde(with = "humantime_serde")]
    pub history_retention: Duration,
}

impl Default for ViewConfig {
    fn default() -> Self {
        ViewConfig {
            enabled: true,
            history_versions: 1000,
            history_retention: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// Ingestion from devices.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    /// The MQTT bridge's broker and topics; `twinflow bridge` needs it.
    pub mqtt: Option<MqttConfig>,
}

/// Which MQTT protocol version the bridge speaks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub enum MqttVersion {
    /// MQTT 5, falling back to 3.1.1 when the broker refuses 5.
    #[default]
    #[serde(rename = "auto")]
    Auto,
    /// MQTT 5 only.
    #[serde(rename = "5")]
    V5,
    /// MQTT 3.1.1 only (no message expiry on commands, no receive maximum).
    #[serde(rename = "3.1.1")]
    V311,
}

/// The MQTT bridge: devices publish readings and command acknowledgements to an MQTT
/// broker, and take their commands from it.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// `mqtt://host:port` or `mqtts://host:port` (TLS; port 8883 by default).
    pub url: String,
    /// The bridge's client id: stable across restarts (its persistent session, with the
    /// readings not yet acknowledged, is kept under it) and unique per bridge.
    #[serde(default = "default_mqtt_client_id")]
    pub client_id: String,
    /// MQTT 5 (`"5"`), 3.1.1 (`"3.1.1"`), or 5 falling back to 3.1.1 (`"auto"`).
    #[serde(default)]
    pub version: MqttVersion,
    /// User name, if the broker asks for one.
    pub username: Option<String>,
    /// Password; set it from the environment or a secret file
    /// (`TWINFLOW_INGEST__MQTT__PASSWORD_FILE=/run/secrets/mqtt`).
    pub password: Option<Secret>,
    /// PEM file of the CA that signed the broker's certificate (default: the system's).
    pub ca_location: Option<PathBuf>,
    /// PEM client certificate, for brokers that require mutual TLS.
    pub certificate_location: Option<PathBuf>,
    /// PEM (PKCS#8) private key of `certificate_location`.
    pub key_location: Option<PathBuf>,
    /// Where devices publish readings; `{asset_id}` is one topic level.
    #[serde(default = "default_telemetry_template")]
    pub telemetry_topic: String,
    /// Where devices publish command acknowledgements.
    #[serde(default = "default_ack_template")]
    pub ack_topic: String,
    /// Where the bridge publishes each device's commands.
    #[serde(default = "default_command_template")]
    pub command_topic: String,
    /// Shared-subscription group: bridges with the same group split the devices' messages
    /// (`$share/<group>/...`). Empty: every bridge gets every message.
    #[serde(default = "default_share_group")]
    pub share_group: String,
    /// A regular expression an asset id from a topic must match in full; others are
    /// dead-lettered (reason `identity`).
    #[serde(default = "default_asset_id_pattern")]
    pub asset_id_pattern: String,
    /// Device field name to model property name, for devices that name them differently
    /// (`{ tempC = "temperature_c" }`).
    #[serde(default)]
    pub field_map: BTreeMap<String, String>,
    /// Readings received and not yet acknowledged to the broker (MQTT 5's receive maximum):
    /// with the packet size, the bound on the bridge's memory while Kafka is away.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: u16,
    /// The largest MQTT packet the bridge takes; configure the broker to refuse larger ones
    /// from devices (mosquitto: `max_packet_size`).
    #[serde(default = "default_max_packet_bytes")]
    pub max_packet_bytes: u32,
    /// How long the broker keeps the bridge's session (its subscriptions and the messages
    /// not yet acknowledged) while the bridge is away.
    #[serde(default = "default_session_expiry", with = "humantime_serde")]
    pub session_expiry: Duration,
    /// MQTT keep-alive.
    #[serde(default = "default_keep_alive", with = "humantime_serde")]
    pub keep_alive: Duration,
    /// Consumer group of the bridges reading the command topic.
    #[serde(default = "default_command_group")]
    pub command_group: String,
}

fn default_mqtt_client_id() -> String {
    "twinflow-bridge".into()
}
fn default_telemetry_template() -> String {
    "assets/{asset_id}/telemetry".into()
}
fn default_ack_template() -> String {
    "assets/{asset_id}/commands/ack".into()
}
fn default_command_template() -> String {
    "assets/{asset_id}/commands".into()
}
fn default_share_group() -> String {
    "twinflow".into()
}
fn default_asset_id_pattern() -> String {
    "[A-Za-z0-9][A-Za-z0-9._:-]{0,127}".into()
}
fn default_max_in_flight() -> u16 {
    1000
}
fn default_max_packet_bytes() -> u32 {
    256 * 1024
}
fn default_session_expiry() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn default_keep_alive() -> Duration {
    Duration::from_secs(30)
}
fn default_command_group() -> String {
    "twinflow-bridge".into()
}

/// A Confluent-compatible schema registry.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// Base URL, `http://` or `https://`.
    pub url: String,
    /// Basic auth user (Confluent's `basic.auth.user.info` is `username:password`).
    pub username: Option<String>,
    /// Basic auth password; set it from the environment or a secret file.
    pub password: Option<Secret>,
    /// PEM file of the CA that signed the registry's certificate (default: the system's).
    pub ca_location: Option<PathBuf>,
    /// PEM client certificate, for registries that require mutual TLS.
    pub certificate_location: Option<PathBuf>,
    /// PEM (PKCS#8) private key of `certificate_location`.
    pub key_location: Option<PathBuf>,
    /// Timeout of one registry request.
    #[serde(default = "registry_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Register the output schemas under `<topic>-value` at start (true), or only look them
    /// up and refuse to start when they are not registered (false, for registries where
    /// schemas are registered by a pipeline of their own).
    #[serde(default = "yes")]
    pub auto_register: bool,
}

fn registry_timeout() -> Duration {
    Duration::from_secs(10)
}

fn yes() -> bool {
    true
}

/// A secret: never printed, not even by `Debug`.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<secret>")
    }
}

/// Kafka settings shared by every client twinflow creates.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// `host:port[,host:port...]`.
    pub bootstrap_servers: String,
    /// Consumer group of the pipeline; instances with the same group share the partitions.
    #[serde(default = "default_group")]
    pub group_id: String,
    /// Any librdkafka property, applied to every client (security settings go here).
    #[serde(default)]
    pub librdkafka: BTreeMap<String, String>,
    /// librdkafka properties for the consumer only (e.g. `fetch.wait.max.ms`).
    #[serde(default)]
    pub consumer: BTreeMap<String, String>,
    /// librdkafka properties for the producer only (e.g. `linger.ms`).
    #[serde(default)]
    pub producer: BTreeMap<String, String>,
}

/// Which kind of client a config is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The pipeline's group consumer.
    Consumer,
    /// The pipeline's producer.
    Producer,
    /// Admin and tooling clients.
    Admin,
}

fn default_group() -> String {
    "twinflow".into()
}

/// Paths of the topology files, relative to the working directory (also the command
/// line's `--topics` and `--model`).
#[derive(Clone, Debug, Deserialize, clap::Args)]
#[serde(deny_unknown_fields, default)]
pub struct TopologyConfig {
    /// Topic declarations.
    #[arg(long, default_value = "topology/topics.toml")]
    pub topics: PathBuf,
    /// Twin model and rules.
    #[arg(long, default_value = "topology/vehicle.toml")]
    pub model: PathBuf,
}

impl TopologyConfig {
    /// The shipped topics with the shipped model `model` (`vehicle`, `pump`) of the
    /// checkout at `root`.
    pub fn shipped(root: &Path, model: &str) -> TopologyConfig {
        TopologyConfig {
            topics: root.join("topology/topics.toml"),
            model: root.join(format!("topology/{model}.toml")),
        }
    }
}

impl Default for TopologyConfig {
    fn default() -> Self {
        TopologyConfig {
            topics: "topology/topics.toml".into(),
            model: "topology/vehicle.toml".into(),
        }
    }
}

/// The RocksDB store.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Directory of the instance's database.
    pub path: PathBuf,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            path: "state".into(),
        }
    }
}

/// Processing guarantees.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Guarantee {
    /// Outputs are delivered before state and position are committed: a crash replays the
    /// uncommitted tail, re-emitting identical records (same twin versions and alert ids).
    #[default]
    AtLeastOnce,
    /// Outputs and input offsets commit in one Kafka transaction; `read_committed`
    /// consumers see each effect once.
    ExactlyOnce,
}

/// The processing loop.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProcessingConfig {
    /// At-least-once or exactly-once.
    pub guarantee: Guarantee,
    /// How often outputs, state and positions are committed (a transaction under
    /// exactly-once). Shorter means lower end-to-end latency for read_committed readers.
    #[serde(with = "humantime_serde")]
    pub commit_interval: Duration,
    /// Most records per batch and partition between two looks at the commit gate.
    pub batch_max_records: usize,
    /// Decoded twins kept in memory per partition.
    pub twin_cache_per_partition: usize,
    /// How long to back off before replaying after a transient failure.
    #[serde(with = "humantime_serde")]
    pub retry_backoff: Duration,
    /// How long a clean stop (SIGTERM or SIGINT: finish the batch, commit, close the stores,
    /// leave the group) may take; past it the process exits non-zero at once, and the
    /// uncommitted work is replayed by the next owner.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// `/healthz` turns false when a partition has input waiting but its committed position
    /// has not moved for this long (the pipeline is wedged).
    #[serde(with = "humantime_serde")]
    pub stall_after: Duration,
    /// How often each partition looks for due timers (offline, idle): a timer fires at most
    /// this long after its deadline. Each look reads only the due part of the deadline index.
    #[serde(with = "humantime_serde")]
    pub timer_interval: Duration,
    /// Transactional id under exactly-once. It must be stable across restarts of an
    /// instance (so a restart fences its previous incarnation and aborts its open
    /// transaction at once) and unique per instance. Default: derived from the group id and
    /// the store path.
    pub transactional_id: Option<String>,
}

impl ProcessingConfig {
    /// How long to wait before trying again after `failures` failures in a row: the retry
    /// back-off, doubled with each one, at most 30 s.
    pub fn backoff(&self, failures: u32) -> Duration {
        (self.retry_backoff * 2u32.pow(failures.min(6))).min(Duration::from_secs(30))
    }
}

impl Default for ProcessingConfig {
    fn default() -> Self {
        ProcessingConfig {
            guarantee: Guarantee::AtLeastOnce,
            commit_interval: Duration::from_millis(100),
            batch_max_records: 2000,
            twin_cache_per_partition: 100_000,
            retry_backoff: Duration::from_millis(500),
            timer_interval: Duration::from_secs(1),
            shutdown_timeout: Duration::from_secs(30),
            stall_after: Duration::from_secs(60),
            transactional_id: None,
        }
    }
}

/// The HTTP endpoint.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address to listen on; loopback unless you mean to expose it.
    pub listen: SocketAddr,
    /// Bearer token required by everything but `/healthz` (`Authorization: Bearer <token>`,
    /// or `?access_token=<token>` where a header cannot be set, as for EventSource). None:
    /// no authentication. Set it from the environment or a secret file.
    pub token: Option<Secret>,
    /// Named write credentials, name to token: a desired-state write
    /// (`PATCH /twins/{id}/desired`) needs one of them in `Authorization: Bearer <token>`,
    /// and the read token never writes. A writer's token also reads. The name, never the
    /// token, is recorded as who set the value (`set_by` = `http:<name>`). Set them from
    /// the environment or secret files: `TWINFLOW_HTTP__WRITERS__OPS_FILE=/run/secrets/ops`.
    /// None: the API takes no writes.
    pub writers: BTreeMap<String, Secret>,
    /// Desired writes one asset takes through the API per minute (a burst of as many, or
    /// spread out); more are answered 429 with `Retry-After`.
    pub desired_writes_per_minute: u32,
    /// Readings one asset may send through `POST /ingest` per minute (a burst of as many, or
    /// spread out); a request with more is answered 429 with `Retry-After`.
    pub ingest_readings_per_minute: u32,
    /// Readings one `POST /ingest` request may carry; more are answered 413.
    pub ingest_max_readings: usize,
    /// Bytes one `POST /ingest` body may have; more are answered 413.
    pub ingest_max_bytes: usize,
    /// The fleet page's map tiles, a URL template with `{z}`, `{x}` and `{y}` (and
    /// optionally `{s}`), fetched by the browser; OpenStreetMap's by default. Empty: no
    /// map, the page plots positions on a plain grid (as it does when no tile loads).
    pub map_tiles: String,
    /// The tiles' attribution, shown on the map (HTML).
    pub map_attribution: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: ([127, 0, 0, 1], 8080).into(),
            token: None,
            writers: BTreeMap::new(),
            desired_writes_per_minute: 30,
            ingest_readings_per_minute: 6000,
            ingest_max_readings: 1000,
            ingest_max_bytes: 1024 * 1024,
            map_tiles: "https://tile.openstreetmap.org/{z}/{x}/{y}.png".to_owned(),
            map_attribution:
                "&copy; <a href=\"https://www.openstreetmap.org/copyright\">OpenStreetMap</a> contributors"
                    .to_owned(),
        }
    }
}

impl Config {
    /// Reads `path`, applies the `TWINFLOW_` environment overrides and validates the result.
    ///
    /// # Errors
    /// `Error::Config` naming the file and the key path of anything unknown or invalid.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("reading {}: {e}", path.display())))?;
        Self::from_toml(&text, std::env::vars())
            .map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    /// Parses configuration text with the given environment.
    ///
    /// # Errors
    /// A message naming the offending key.
    pub fn from_toml(
        text: &str,
        env: impl Iterator<Item = (String, String)>,
    ) -> Result<Config, String> {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
        for (name, value) in env {
            // Only `TWINFLOW_<SECTION>__<KEY>` names configuration; other `TWINFLOW_` variables
            // (such as TWINFLOW_LOG_FORMAT) belong to the command line.
            let Some(rest) = name.strip_prefix("TWINFLOW_").filter(|r| r.contains("__")) else {
                continue;
            };
            let (rest, value) = match rest.strip_suffix("_FILE") {
                Some(rest) => {
                    let secret = std::fs::read_to_string(&value)
                        .map_err(|e| format!("{name}: reading {value}: {e}"))?;
                    (rest, secret.trim_end_matches(['\r', '\n']).to_owned())
                }
                None => (rest, value),
            };
            let path: Vec<String> = rest.split("__").map(str::to_lowercase).collect();
            apply_override(&mut table, &path, value).map_err(|e| format!("{name}: {e}"))?;
        }
        let config: Config = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e| format!("key `{}`: {}", e.path(), e.inner()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks relationships between values.
    ///
    /// # Errors
    /// A message naming the key.
    pub fn validate(&self) -> Result<(), String> {
        if self.kafka.bootstrap_servers.trim().is_empty() {
            return Err("key `kafka.bootstrap_servers`: must not be empty".into());
        }
        if self.processing.commit_interval.is_zero() {
            return Err("key `processing.commit_interval`: must be longer than 0".into());
        }
        if self.processing.timer_interval.is_zero() {
            return Err("key `processing.timer_interval`: must be longer than 0".into());
        }
        if self.processing.batch_max_records == 0 {
            return Err("key `processing.batch_max_records`: must be at least 1".into());
        }
        if self.processing.twin_cache_per_partition < self.processing.batch_max_records {
            return Err(format!(
                "key `processing.twin_cache_per_partition`: must be at least batch_max_records ({}), since a batch keeps its twins in memory",
                self.processing.batch_max_records
            ));
        }
        if let Some(r) = &self.schema_registry {
            if !(r.url.starts_with("http://") || r.url.starts_with("https://")) {
                return Err(format!(
                    "key `schema_registry.url`: '{}' must start with http:// or https://",
                    r.url
                ));
            }
            if r.password.is_some() && r.username.is_none() {
                return Err("key `schema_registry.password`: set `username` too".into());
            }
            if r.certificate_location.is_some() != r.key_location.is_some() {
                return Err(
                    "keys `schema_registry.certificate_location` and `key_location`: set both or neither"
                        .into(),
                );
            }
        }
        for (name, token) in &self.http.writers {
            let named = !name.is_empty()
                && name.len() <= 64
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
            if !named {
                return Err(format!(
                    "key `http.writers.{name}`: a writer's name is 1 to 64 letters, digits, '-', '_' or '.'"
                ));
            }
            if token.0.len() < 16 {
                return Err(format!(
                    "key `http.writers.{name}`: a write token must be at least 16 characters"
                ));
            }
            if self.http.token.as_ref().is_some_and(|t| t.0 == token.0) {
                return Err(format!(
                    "key `http.writers.{name}`: must differ from http.token (the read token never writes)"
                ));
            }
        }
        let tiles = &self.http.map_tiles;
        if !tiles.is_empty() && !["{z}", "{x}", "{y}"].iter().all(|p| tiles.contains(p)) {
            return Err(
                "key `http.map_tiles`: a tile URL template with {z}, {x} and {y}, or empty for no map"
                    .into(),
            );
        }
        if self.http.ingest_max_readings == 0 || self.http.ingest_max_bytes == 0 {
            return Err(
                "keys `http.ingest_max_readings` and `http.ingest_max_bytes`: must be at least 1"
                    .into(),
            );
        }
        if self.http.ingest_readings_per_minute == 0 {
            return Err("key `http.ingest_readings_per_minute`: must be at least 1".into());
        }
        if self.http.desired_writes_per_minute == 0 {
            return Err("key `http.desired_writes_per_minute`: must be at least 1".into());
        }
        if let Some(m) = &self.ingest.mqtt {
            m.validate()?;
        }
        let passthrough = || {
            self.kafka
                .librdkafka
                .keys()
                .chain(self.kafka.consumer.keys())
                .chain(self.kafka.producer.keys())
        };
        for key in [
            "bootstrap.servers",
            "group.id",
            "enable.auto.offset.store",
            "isolation.level",
        ] {
            if passthrough().any(|k| k == key) {
                return Err(format!(
                    "key `kafka.librdkafka.\"{key}\"`: twinflow sets this itself; use the typed setting instead"
                ));
            }
        }
        Ok(())
    }
}

impl MqttConfig {
    fn validate(&self) -> Result<(), String> {
        let key = |k: &str| format!("key `ingest.mqtt.{k}`");
        if !(self.url.starts_with("mqtt://") || self.url.starts_with("mqtts://")) {
            return Err(format!(
                "{}: '{}' must start with mqtt:// or mqtts://",
                key("url"),
                self.url
            ));
        }
        for (name, template) in [
            ("telemetry_topic", &self.telemetry_topic),
            ("ack_topic", &self.ack_topic),
            ("command_topic", &self.command_topic),
        ] {
            crate::bridge::TopicTemplate::parse(template)
                .map_err(|e| format!("{}: {e}", key(name)))?;
        }
        if self.share_group.contains(['/', '+', '#']) {
            return Err(format!("{}: no '/', '+' or '#'", key("share_group")));
        }
        regex::Regex::new(&self.asset_id_pattern)
            .map_err(|e| format!("{}: {e}", key("asset_id_pattern")))?;
        if self.max_in_flight == 0 {
            return Err(format!("{}: must be at least 1", key("max_in_flight")));
        }
        if !(1024..=16 * 1024 * 1024).contains(&self.max_packet_bytes) {
            return Err(format!("{}: from 1 KiB to 16 MiB", key("max_packet_bytes")));
        }
        if self.password.is_some() && self.username.is_none() {
            return Err(format!("{}: set `username` too", key("password")));
        }
        if self.certificate_location.is_some() != self.key_location.is_some() {
            return Err(format!(
                "{} and `key_location`: set both or neither",
                key("certificate_location")
            ));
        }
        if !(5..=u64::from(u16::MAX)).contains(&self.keep_alive.as_secs()) {
            return Err(format!(
                "{}: from 5 s to 65535 s (MQTT's limit)",
                key("keep_alive")
            ));
        }
        if self.client_id.is_empty() || self.client_id.len() > 128 {
            return Err(format!("{}: 1 to 128 characters", key("client_id")));
        }
        Ok(())
    }
}

fn apply_override(table: &mut toml::Table, path: &[String], value: String) -> Result<(), String> {
    let (last, parents) = path.split_last().ok_or("empty key")?;
    let mut at = table;
    for (i, part) in parents.iter().enumerate() {
        at = at
            .entry(part.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| format!("`{}` is not a table", path[..=i].join(".")))?;
        if i == 1
            && path[0] == "kafka"
            && matches!(part.as_str(), "librdkafka" | "consumer" | "producer")
        {
            // librdkafka property names use dots; env names cannot.
            let key = path[i + 1..].join("_").replace('_', ".");
            at.insert(key, toml::Value::String(value));
            return Ok(());
        }
    }
    // Typed keys: numbers and booleans as such, everything else as a string.
    let parsed = format!("v = {value}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .filter(|v| !v.is_table() && !v.is_array())
        .unwrap_or(toml::Value::String(value));
    at.insert(last.clone(), parsed);
    Ok(())
}

impl KafkaConfig {
    /// Writes the servers and the passthrough properties for `role` into `c`, over whatever
    /// defaults `c` already holds.
    pub fn apply(&self, c: &mut ClientConfig, role: Role) {
        c.set("bootstrap.servers", &self.bootstrap_servers);
        let own = match role {
            Role::Consumer => Some(&self.consumer),
            Role::Producer => Some(&self.producer),
            Role::Admin => None,
        };
        for (k, v) in self.librdkafka.iter().chain(own.into_iter().flatten()) {
            c.set(k, v);
        }
    }

    /// A client config for admin and tooling clients.
    pub fn admin_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        self.apply(&mut c, Role::Admin);
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "[kafka]\nbootstrap_servers = \"localhost:9092\"\n";

    fn parse(text: &str, env: &[(&str, &str)]) -> Result<Config, String> {
        Config::from_toml(
            text,
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    #[test]
    fn defaults_fill_what_the_file_leaves_out() {
        let c = parse(MINIMAL, &[]).unwrap();
        assert_eq!(c.kafka.group_id, "twinflow");
        assert_eq!(c.http.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.processing.retry_backoff, Duration::from_millis(500));
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = parse(
            &format!("{MINIMAL}[processing]\nbatch_max_recrods = 5\n"),
            &[],
        )
        .unwrap_err();
        assert!(err.contains("batch_max_recrods"), "{err}");
        let err = parse(
            &format!("{MINIMAL}[processing]\nretry_backoff = \"soon\"\n"),
            &[],
        )
        .unwrap_err();
        assert!(err.contains("processing.retry_backoff"), "{err}");
    }

    #[test]
    fn environment_overrides_the_file() {
        let c = parse(
            MINIMAL,
            &[
                ("TWINFLOW_KAFKA__BOOTSTRAP_SERVERS", "b1:9092,b2:9092"),
                ("TWINFLOW_PROCESSING__BATCH_MAX_RECORDS", "500"),
                ("TWINFLOW_KAFKA__LIBRDKAFKA__SASL_PASSWORD", "s3cret"),
                ("OTHER", "ignored"),
                ("TWINFLOW_LOG_FORMAT", "json"),
            ],
        )
        .unwrap();
        assert_eq!(c.kafka.bootstrap_servers, "b1:9092,b2:9092");
        assert_eq!(c.processing.batch_max_records, 500);
        assert_eq!(c.kafka.librdkafka["sasl.password"], "s3cret");
        let err = parse(
            MINIMAL,
            &[("TWINFLOW_PROCESSING__BATCH_MAX_RECORDS", "many")],
        )
        .unwrap_err();
        assert!(err.contains("processing.batch_max_records"), "{err}");
    }

    #[test]
    fn the_reference_config_is_valid() {
        let text = include_str!("../docker/twinflow.toml");
        let c = parse(text, &[]).unwrap();
        assert_eq!(c.kafka.bootstrap_servers, "kafka:9092");
    }

    #[test]
    fn relationships_are_checked_up_front() {
        let err = parse(
            &format!("{MINIMAL}[processing]\nbatch_max_records = 0\n"),
            &[],
        )
        .unwrap_err();
        assert!(err.contains("batch_max_records"), "{err}");
        let err = parse(
            &format!("{MINIMAL}[kafka.librdkafka]\n\"group.id\" = \"x\"\n"),
            &[],
        )
        .unwrap_err();
        assert!(err.contains("group.id"), "{err}");
    }

    #[test]
    fn write_credentials_are_named_long_and_never_the_read_token() {
        let c = parse(
            &format!("{MINIMAL}[http]\ntoken = \"read-token-0123456789\"\n"),
            &[("TWINFLOW_HTTP__WRITERS__OPS", "write-token-0123456789")],
        )
        .unwrap();
        assert_eq!(c.http.writers["ops"].0, "write-token-0123456789");
        for (writers, wrong) in [
            ("ops = \"short\"", "at least 16"),
            (
                "ops = \"read-token-0123456789\"",
                "must differ from http.token",
            ),
            ("\"a b\" = \"write-token-0123456789\"", "writer's name"),
        ] {
            let text = format!(
                "{MINIMAL}[http]\ntoken = \"read-token-0123456789\"\n[http.writers]\n{writers}\n"
            );
            let err = parse(&text, &[]).unwrap_err();
            assert!(err.contains(wrong), "{writers}: {err}");
        }
    }

    #[test]
    fn secrets_come_from_files_named_in_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("kafka_password");
        std::fs::write(&secret, "s3cret\n").unwrap();
        let file = secret.display().to_string();
        let c = parse(
            MINIMAL,
            &[("TWINFLOW_KAFKA__LIBRDKAFKA__SASL_PASSWORD_FILE", &file)],
        )
        .unwrap();
        assert_eq!(
            c.kafka.librdkafka.get("sasl.password").map(String::as_str),
            Some("s3cret")
        );
        let err = parse(
            MINIMAL,
            &[(
                "TWINFLOW_KAFKA__LIBRDKAFKA__SASL_PASSWORD_FILE",
                "/nonexistent/secret",
            )],
        )
        .unwrap_err();
        assert!(
            err.contains("SASL_PASSWORD_FILE") && err.contains("/nonexistent/secret"),
            "{err}"
        );
    }

    #[test]
    fn the_mqtt_section_takes_its_password_from_a_file_and_checks_its_templates() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("mqtt_password");
        std::fs::write(&secret, "bridge-pass\n").unwrap();
        let file = secret.display().to_string();
        let text =
            format!("{MINIMAL}\n[ingest.mqtt]\nurl = \"mqtts://broker\"\nusername = \"bridge\"\n");
        let c = parse(&text, &[("TWINFLOW_INGEST__MQTT__PASSWORD_FILE", &file)]).unwrap();
        let mqtt = c.ingest.mqtt.expect("the section");
        assert_eq!(mqtt.password.map(|p| p.0).as_deref(), Some("bridge-pass"));
        assert_eq!(mqtt.telemetry_topic, "assets/{asset_id}/telemetry");
        for (line, key) in [
            ("url = \"tcp://broker\"", "ingest.mqtt.url"),
            (
                "telemetry_topic = \"assets/+/telemetry\"",
                "ingest.mqtt.telemetry_topic",
            ),
            ("asset_id_pattern = \"(\"", "ingest.mqtt.asset_id_pattern"),
            ("max_in_flight = 0", "ingest.mqtt.max_in_flight"),
            ("keep_alive = \"30h\"", "ingest.mqtt.keep_alive"),
            ("password = \"x\"", "ingest.mqtt.password"),
        ] {
            let url = if line.starts_with("url") {
                ""
            } else {
                "url = \"mqtt://b\"\n"
            };
            let err = parse(&format!("{MINIMAL}\n[ingest.mqtt]\n{url}{line}\n"), &[]).unwrap_err();
            assert!(err.contains(key), "{line}: {err}");
        }
    }
}
