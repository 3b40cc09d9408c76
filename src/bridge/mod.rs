//! `twinflow bridge`: devices that speak MQTT. The bridge takes readings and command
//! acknowledgements from an MQTT broker into Kafka, and commands from Kafka to the devices.
//!
//! - **No loss.** The bridge subscribes at QoS 1 with a persistent session and acknowledges
//!   a device's message (PUBACK) only after Kafka's delivery report for its record
//!   (idempotent producer, `acks=all`), in the order the messages came (MQTT's rule). A
//!   record Kafka does not take is sent again; the message stays unacknowledged meanwhile.
//!   A bridge that dies leaves its unacknowledged messages with the broker, which delivers
//!   them again (DUP); the pipeline skips a reading it already has.
//! - **Back-pressure.** At most `max_in_flight` messages are unacknowledged (MQTT 5's receive
//!   maximum): while Kafka is away the broker stops sending and queues. The bridge's
//!   memory for device messages is bounded by `max_in_flight` × `max_packet_bytes`.
//! - **Identity.** See [`device`]: the asset id is the topic's, checked against a pattern.
//! - **Commands.** See [`commands`]: the bridges share the command topic in their own
//!   consumer group; a command's offset is committed once the broker has acknowledged its
//!   publish.

pub mod commands;
mod device;
mod mqtt;
mod topic;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::stream::FuturesOrdered;
use futures::{FutureExt, StreamExt};
use rdkafka::Message as _;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use commands::Outcome;
pub use device::{Devices, Routed};
pub use mqtt::endpoint;
pub use topic::TopicTemplate;

use crate::clock::{Clock, SystemClock};
use crate::codec::decode_command;
use crate::config::{Config, MqttConfig, MqttVersion};
use crate::error::{Disposition, Error, Result};
use crate::kafka::Clients;
use crate::metrics::BridgeMetrics;
use crate::pipeline::{Input, Outputs, Stage};
use crate::topology::Topology;

/// Most command records taken as one batch (see [`commands`]).
const COMMAND_BATCH: usize = 10_000;
/// How long a batch of commands waits for the rest of a partition it has not read to its
/// end (a record beyond the last one delivered may never come: an aborted transaction's).
const COMMAND_LINGER: Duration = Duration::from_millis(250);

/// A record for Kafka, owned so its delivery can outlive the message it came from.
struct Record {
    topic: String,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    headers: Vec<(String, Option<Vec<u8>>)>,
}

/// A device message on its way: resolves, in arrival order, once Kafka has its record.
type Delivery = BoxFuture<'static, (mqtt::Message, Instant, Result<()>)>;

/// Sends `record` until Kafka takes it; gives up only on an error that retrying cannot fix
/// (authorisation, for one).
async fn deliver(producer: FutureProducer, record: Record, metrics: BridgeMetrics) -> Result<()> {
    let mut failures: u32 = 0;
    loop {
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
        for (key, value) in &record.headers {
            headers = headers.insert(Header {
                key,
                value: value.as_deref(),
            });
        }
        let mut r: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&record.topic).headers(headers);
        r.key = record.key.as_deref();
        r.payload = record.value.as_deref();
        match producer.send(r, Timeout::Never).await {
            Ok(_) => return Ok(()),
            Err((e, _)) => {
                let e = Error::Kafka(e);
                if e.disposition() == Disposition::Fatal {
                    return Err(e);
                }
                metrics.delivery_retries.inc();
                tracing::warn!(topic = %record.topic, error = %e, "Kafka did not take a device's record; sending it again.");
                let backoff = Duration::from_millis(100) * 2u32.pow(failures.min(7));
                tokio::time::sleep(backoff.min(Duration::from_secs(10))).await;
                failures += 1;
            }
        }
    }
}

/// A command publish waiting for the broker's acknowledgement, in consume order.
struct Waiting {
    partition: i32,
    offset: i64,
    /// The packet id the publish left with.
    pkid: Option<u16>,
    /// Acknowledged by the broker, or never published.
    done: bool,
}

/// The command topic's side: consume, publish to devices, commit what the broker has.
struct CommandsOut {
    consumer: StreamConsumer,
    topic: String,
    template: TopicTemplate,
    waiting: VecDeque<Waiting>,
    limit: usize,
    /// Records read and not yet published.
    batch: Vec<rdkafka::message::OwnedMessage>,
}

impl CommandsOut {
    fn new(clients: &Clients, config: &MqttConfig, topic: &str) -> Result<CommandsOut> {
        let consumer: StreamConsumer = clients.bridge_consumer(&config.command_group).create()?;
        consumer.subscribe(&[topic])?;
        Ok(CommandsOut {
            consumer,
            topic: topic.to_owned(),
            template: TopicTemplate::parse(&config.command_topic).map_err(Error::Config)?,
            waiting: VecDeque::new(),
            limit: usize::from(config.max_in_flight),
            batch: Vec::new(),
        })
    }

    /// Room for more publishes awaiting the broker.
    fn room(&self) -> bool {
        self.waiting.len() < self.limit
    }

    /// Fills `self.batch`: waits for a record, then reads on until every partition it has
    /// records of is read to its end as last seen (the replay of a restarted bridge arrives
    /// whole), or for [`COMMAND_LINGER`] without a record, or up to [`COMMAND_BATCH`].
    /// Cancel-safe: what it read stays in `self.batch`.
    async fn fill(&mut self) {
        loop {
            let ready = !self.batch.is_empty();
            if self.batch.len() >= COMMAND_BATCH || (ready && self.read_to_end()) {
                return;
            }
            let next = if ready {
                match tokio::time::timeout(COMMAND_LINGER, self.consumer.recv()).await {
                    Ok(next) => next,
                    Err(_) => return,
                }
            } else {
                self.consumer.recv().await
            };
            match next {
                Ok(m) => self.batch.push(m.detach()),
                Err(e) => {
                    tracing::warn!(error = %e, "Reading the command topic failed.");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// Whether each partition with records in the batch has been read to its end as the
    /// last fetch saw it.
    fn read_to_end(&self) -> bool {
        let mut next: std::collections::BTreeMap<i32, i64> = std::collections::BTreeMap::new();
        for m in &self.batch {
            next.insert(m.partition(), m.offset() + 1);
        }
        next.iter().all(|(p, next)| {
            crate::kafka::cached_watermarks(&self.consumer, &self.topic, *p)
                .is_none_or(|(_, end)| *next >= end)
        })
    }

    /// Publishes the batch to the devices (see [`commands`]).
    async fn publish(
        &mut self,
        client: &mqtt::Client,
        metrics: &BridgeMetrics,
        now_ms: i64,
    ) -> Result<()> {
        let batch = std::mem::take(&mut self.batch);
        let mut decoded: Vec<_> = batch
            .iter()
            .map(|m| m.payload().and_then(|p| decode_command(p).ok()))
            .collect();
        let undecodable: Vec<bool> = decoded.iter().map(Option::is_none).collect();
        commands::supersede(&mut decoded);
        for ((m, command), undecodable) in batch.iter().zip(decoded).zip(undecodable) {
            let outcome = match &command {
                _ if undecodable => Outcome::Undecodable,
                None => Outcome::Superseded,
                Some(c) => match (
                    commands::expiry_secs(c, now_ms),
                    self.template.topic_of(&c.asset_id),
                ) {
                    (Err(()), _) => Outcome::Expired,
                    (_, None) => Outcome::Unroutable,
                    (Ok(expiry), Some(topic)) => {
                        client.publish(&topic, commands::to_json(c), expiry).await?;
                        Outcome::Published
                    }
                },
            };
            if outcome == Outcome::Undecodable {
                tracing::warn!(
                    partition = m.partition(),
                    offset = m.offset(),
                    "A command record is not one; skipped."
                );
            }
            metrics.command(outcome.label());
            self.waiting.push_back(Waiting {
                partition: m.partition(),
                offset: m.offset(),
                pkid: None,
                done: outcome != Outcome::Published,
            });
        }
        self.settle();
        Ok(())
    }

    /// A publish left with `pkid`: the oldest publish without one, unless it is a
    /// retransmission of one still waiting.
    fn sent(&mut self, pkid: u16) {
        if self.waiting.iter().any(|w| w.pkid == Some(pkid) && !w.done) {
            return;
        }
        if let Some(w) = self
            .waiting
            .iter_mut()
            .find(|w| w.pkid.is_none() && !w.done)
        {
            w.pkid = Some(pkid);
        }
    }

    /// The broker acknowledged `pkid`.
    fn acknowledged(&mut self, pkid: u16) {
        if let Some(w) = self
            .waiting
            .iter_mut()
            .find(|w| w.pkid == Some(pkid) && !w.done)
        {
            w.done = true;
        }
        self.settle();
    }

    /// Stores the offsets of the finished front for the consumer's next commit.
    fn settle(&mut self) {
        while self.waiting.front().is_some_and(|w| w.done) {
            let w = self.waiting.pop_front().expect("a front");
            if let Err(e) = self
                .consumer
                .store_offset(&self.topic, w.partition, w.offset)
            {
                // The partition was handed over; its new owner replays from its commit.
                tracing::debug!(partition = w.partition, error = %e, "Command offset not stored.");
            }
        }
    }
}

/// Connects, falling back from MQTT 5 to 3.1.1 under `version = "auto"` when the broker
/// answers that it does not speak 5. Events seen while finding out go to `events`.
async fn connect(
    config: &MqttConfig,
    events: &mpsc::UnboundedSender<mqtt::Event>,
) -> Result<(mqtt::Client, mqtt::Connection)> {
    let first = if config.version == MqttVersion::V311 {
        MqttVersion::V311
    } else {
        MqttVersion::V5
    };
    let (client, mut connection) = mqtt::connect(config, first)?;
    loop {
        match connection.poll().await {
            Ok(Some(e @ mqtt::Event::Connected { .. })) => {
                let _ = events.send(e);
                return Ok((client, connection));
            }
            Ok(Some(e)) => {
                let _ = events.send(e);
            }
            Ok(None) => {}
            Err(e) if e.not_v5 && config.version == MqttVersion::Auto => {
                tracing::info!(error = %e.message, "The MQTT broker does not speak MQTT 5; using 3.1.1.");
                return mqtt::connect(config, MqttVersion::V311);
            }
            Err(e) => {
                // Not reachable yet: the connection keeps trying.
                tracing::warn!(url = %config.url, error = %e.message, "Cannot connect to the MQTT broker yet.");
                return Ok((client, connection));
            }
        }
    }
}

/// Drives the MQTT connection, reconnecting with back-off, until `stop`.
async fn drive(
    mut connection: mqtt::Connection,
    events: mpsc::UnboundedSender<mqtt::Event>,
    metrics: BridgeMetrics,
    stop: CancellationToken,
) {
    let mut failures: u32 = 0;
    loop {
        let polled = tokio::select! {
            () = stop.cancelled() => return,
            p = connection.poll() => p,
        };
        match polled {
            Ok(Some(mqtt::Event::Closed)) => return,
            Ok(Some(e)) => {
                if matches!(e, mqtt::Event::Connected { .. }) {
                    failures = 0;
                }
                if events.send(e).is_err() {
                    return;
                }
            }
            Ok(None) => {}
            Err(e) => {
                metrics.connected.set(0);
                if failures < 3 || failures % 30 == 0 {
                    tracing::warn!(error = %e.message, "MQTT connection lost; reconnecting.");
                }
                let backoff = Duration::from_millis(200) * 2u32.pow(failures.min(5));
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(backoff.min(Duration::from_secs(5))) => {}
                }
                failures += 1;
            }
        }
    }
}

/// What the bridge needs to turn a device's message into a record.
struct Intake {
    devices: Devices,
    topology: Arc<Topology>,
    max_record_bytes: usize,
    outputs: Outputs,
}

impl Intake {
    /// The record of `m`, and what to count it as.
    fn record(&mut self, m: &mqtt::Message) -> (Record, &'static str, &'static str) {
        let topics = &self.topology.topics;
        match self.devices.route(&m.topic, &m.payload) {
            Routed::Reading { asset_id, value } => (
                Record {
                    topic: topics.telemetry.name.clone(),
                    key: Some(asset_id.into_bytes()),
                    value: Some(value),
                    headers: Vec::new(),
                },
                "mqtt",
                "accepted",
            ),
            Routed::Ack { asset_id } => (
                Record {
                    topic: topics.acks.name.clone(),
                    key: Some(asset_id.into_bytes()),
                    value: Some(m.payload.to_vec()),
                    headers: Vec::new(),
                },
                "mqtt_ack",
                "accepted",
            ),
            Routed::Refused {
                asset_id,
                reason,
                message,
            } => {
                self.outputs.clear();
                let input = Input {
                    key: asset_id.as_deref().map(str::as_bytes),
                    payload: Some(&m.payload),
                    topic: &m.topic,
                    offset: -1,
                    headers: None,
                };
                let why = crate::pipeline::Why {
                    reason,
                    stage: Stage::Bridge,
                    message: &message,
                };
                crate::pipeline::dead_letter(
                    &mut self.outputs,
                    &input,
                    -1,
                    &why,
                    self.max_record_bytes,
                );
                let mut scratch = String::new();
                let routed = self
                    .outputs
                    .route(&self.outputs.records[0], topics, -1, &mut scratch);
                let record = Record {
                    topic: routed.topic.to_owned(),
                    key: routed.key.map(<[u8]>::to_vec),
                    value: routed.value.map(<[u8]>::to_vec),
                    headers: routed
                        .headers
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), v.map(<[u8]>::to_vec)))
                        .collect(),
                };
                let source = if self.devices.is_ack_topic(&m.topic) {
                    "mqtt_ack"
                } else {
                    "mqtt"
                };
                (record, source, reason.label())
            }
        }
    }
}

/// The bridge of `config`'s `[ingest.mqtt]`, until `stop`; metrics on `metrics`.
///
/// # Errors
/// A configuration the bridge cannot run with, a Kafka error that retrying cannot fix,
/// or the MQTT client stopping.
pub async fn run(config: &Config, metrics: BridgeMetrics, stop: CancellationToken) -> Result<()> {
    let mqtt_config =
        config.ingest.mqtt.as_ref().ok_or_else(|| {
            Error::Config("`twinflow bridge` needs an [ingest.mqtt] section".into())
        })?;
    let topology = Arc::new(Topology::load(&config.topology)?);
    let clients = Clients::new(config);
    let producer_config = clients.writer();
    let max_record_bytes = producer_config
        .get("message.max.bytes")
        .and_then(|v| v.parse().ok())
        .unwrap_or(crate::kafka::DEFAULT_MAX_RECORD_BYTES);
    let producer: FutureProducer = producer_config.create()?;
    let mut intake = Intake {
        devices: Devices::new(mqtt_config, topology.clone())?,
        topology: topology.clone(),
        max_record_bytes,
        outputs: Outputs::default(),
    };
    let mut commands = CommandsOut::new(&clients, mqtt_config, &topology.topics.commands.name)?;

    let (tx, mut events) = mpsc::unbounded_channel();
    let (client, connection) = connect(mqtt_config, &tx).await?;
    let driving = CancellationToken::new();
    let mut driver = tokio::spawn(drive(connection, tx, metrics.clone(), driving.clone()));
    tracing::info!(
        url = %mqtt_config.url,
        version = client.version(),
        telemetry = %mqtt_config.telemetry_topic,
        commands = %mqtt_config.command_topic,
        "MQTT bridge running."
    );

    let mut pending: FuturesOrdered<Delivery> = FuturesOrdered::new();
    // Subscriptions granted since the last (re)connect: both, and the bridge is up.
    let mut granted = 0;
    let outcome: Result<()> = loop {
        tokio::select! {
            () = stop.cancelled() => break Ok(()),
            Some((m, received, delivered)) = pending.next(), if !pending.is_empty() => {
                if let Err(e) = delivered {
                    break Err(e);
                }
                client.ack(&m);
                metrics.ack_seconds.observe(received.elapsed().as_secs_f64());
                metrics.in_flight.set(pending.len() as i64);
            }
            event = events.recv() => match event {
                None => break Err(Error::Mqtt("the MQTT connection stopped".into())),
                Some(mqtt::Event::Connected { session_present }) => {
                    tracing::info!(session_present, "Connected to the MQTT broker.");
                    metrics.connected.set(0);
                    granted = 0;
                    let [telemetry, acks] = intake.devices.filters(&mqtt_config.share_group);
                    if let Err(e) = client.subscribe(&telemetry).await {
                        break Err(e);
                    }
                    if let Err(e) = client.subscribe(&acks).await {
                        break Err(e);
                    }
                }
                Some(mqtt::Event::Message(m)) => {
                    let received = Instant::now();
                    let (record, source, result) = intake.record(&m);
                    metrics.record(source, result);
                    let delivery = deliver(producer.clone(), record, metrics.clone());
                    pending.push_back(Box::pin(delivery.map(move |r| (m, received, r))));
                    metrics.in_flight.set(pending.len() as i64);
                }
                Some(mqtt::Event::Subscribed) => {
                    granted += 1;
                    if granted == 2 {
                        metrics.connected.set(1);
                        tracing::info!("Subscribed to the devices' topics.");
                    }
                }
                Some(mqtt::Event::Sent(pkid)) => commands.sent(pkid),
                Some(mqtt::Event::Closed) => {}
                Some(mqtt::Event::Acknowledged(pkid)) => commands.acknowledged(pkid),
            },
            () = commands.fill(), if commands.room() => {
                if let Err(e) = commands.publish(&client, &metrics, SystemClock.now_ms()).await {
                    break Err(e);
                }
            }
        }
    };
    // A clean stop acknowledges what Kafka already has; the rest the broker sends again.
    let drain = async {
        while let Some((m, _, delivered)) = pending.next().await {
            if delivered.is_ok() {
                client.ack(&m);
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
    client.disconnect().await;
    if tokio::time::timeout(Duration::from_secs(2), &mut driver)
        .await
        .is_err()
    {
        driving.cancel();
        let _ = driver.await;
    }
    outcome
}

/// The bridge's HTTP endpoint on `listener`: `/metrics` (behind `token` if set) and
/// `/healthz` (200 while connected to the MQTT broker and subscribed, else 503), until
/// `stop`.
///
/// # Errors
/// When serving fails.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: BridgeMetrics,
    token: Option<String>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    use axum::http::{HeaderMap, StatusCode, header};
    use axum::routing::get;
    let health = metrics.connected.clone();
    let router = axum::Router::new()
        .route(
            "/healthz",
            get(move || async move {
                if health.get() == 1 {
                    (
                        StatusCode::OK,
                        "connected to the MQTT broker and subscribed\n",
                    )
                } else {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "not connected to the MQTT broker\n",
                    )
                }
            }),
        )
        .route(
            "/metrics",
            get(move |headers: HeaderMap| async move {
                let bearer = headers
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "));
                if token.is_some() && bearer != token.as_deref() {
                    return (
                        StatusCode::UNAUTHORIZED,
                        "a bearer token is required\n".to_owned(),
                    );
                }
                let text = prometheus::TextEncoder::new()
                    .encode_to_string(&metrics.registry().gather())
                    .unwrap_or_default();
                (StatusCode::OK, text)
            }),
        );
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
}
