//! Where simulated devices send their readings: straight to the telemetry topic, to an
//! instance's HTTP ingestion endpoint (`POST /ingest`), or to an MQTT broker that a bridge
//! carries into Kafka. The fleet makes Avro records; the HTTP and MQTT doors take JSON, so
//! a record is turned into the JSON a device would send (a malformed one, which does not
//! decode, goes as its raw bytes over MQTT and is left out over HTTP, where the answer would
//! only refuse it).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rdkafka::ClientConfig;
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};

use super::sim::Counting;
use crate::codec::Format;
use crate::topology::Topology;
use crate::twin::Reading;

/// The door the simulated devices use.
#[derive(Clone, Debug)]
pub enum Via {
    /// Records straight to the telemetry topic.
    Kafka,
    /// `POST /ingest` of an instance.
    Http {
        /// The instance, e.g. `http://127.0.0.1:8080`.
        url: String,
        /// A write credential.
        token: String,
        /// The runtime the requests run on (the simulator is a plain thread).
        runtime: tokio::runtime::Handle,
    },
    /// Published to `assets/{asset_id}/telemetry` at QoS 1.
    Mqtt {
        /// `mqtt://host:port`.
        url: String,
    },
}

/// Readings per `POST /ingest`.
const HTTP_BATCH: usize = 200;

/// An open door.
pub(super) enum Sink {
    Kafka {
        producer: ThreadedProducer<Counting>,
        topic: String,
        failed: Arc<AtomicU64>,
    },
    Http {
        client: reqwest::Client,
        url: String,
        token: String,
        runtime: tokio::runtime::Handle,
        batch: Vec<serde_json::Value>,
        failed: u64,
    },
    Mqtt {
        client: rumqttc::v5::Client,
        sent: u64,
        acknowledged: Arc<AtomicU64>,
        closed: Arc<AtomicU64>,
    },
}

impl Sink {
    /// Opens `via`; Kafka through `client` to `topic`.
    pub(super) fn open(via: &Via, client: &ClientConfig, topic: &str) -> Result<Sink> {
        Ok(match via {
            Via::Kafka => {
                let failed = Arc::new(AtomicU64::new(0));
                let producer = client
                    .clone()
                    .set("linger.ms", "5")
                    // Keeps each vehicle's readings in order through retries.
                    .set("enable.idempotence", "true")
                    .set("compression.type", "lz4")
                    .create_with_context(Counting(failed.clone()))
                    .context("creating the simulator's producer")?;
                Sink::Kafka {
                    producer,
                    topic: topic.to_owned(),
                    failed,
                }
            }
            Via::Http {
                url,
                token,
                runtime,
            } => Sink::Http {
                client: reqwest::Client::new(),
                url: format!("{}/ingest", url.trim_end_matches('/')),
                token: token.clone(),
                runtime: runtime.clone(),
                batch: Vec::with_capacity(HTTP_BATCH),
                failed: 0,
            },
            Via::Mqtt { url } => {
                let (host, port, tls) = crate::bridge::endpoint(url)?;
                if tls {
                    bail!("the simulator publishes to mqtt:// brokers only");
                }
                let id = format!("twinflow-simulator-{}", std::process::id());
                let mut options = rumqttc::v5::MqttOptions::new(id, host, port);
                options.set_keep_alive(Duration::from_secs(30));
                let (client, mut connection) = rumqttc::v5::Client::new(options, 1000);
                let acknowledged = Arc::new(AtomicU64::new(0));
                let closed = Arc::new(AtomicU64::new(0));
                let (acks, down) = (acknowledged.clone(), closed.clone());
                std::thread::spawn(move || {
                    use rumqttc::v5::mqttbytes::v5::Packet;
                    for event in connection.iter() {
                        match event {
                            Ok(rumqttc::v5::Event::Incoming(Packet::PubAck(_))) => {
                                acks.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(rumqttc::v5::Event::Outgoing(rumqttc::Outgoing::Disconnect)) => {
                                break;
                            }
                            Ok(_) => {}
                            Err(rumqttc::v5::ConnectionError::RequestsDone) => break,
                            Err(error) => {
                                tracing::warn!(%error, "Simulator's MQTT connection lost; reconnecting.");
                                std::thread::sleep(Duration::from_millis(500));
                            }
                        }
                    }
                    down.store(1, Ordering::Relaxed);
                });
                Sink::Mqtt {
                    client,
                    sent: 0,
                    acknowledged,
                    closed,
                }
            }
        })
    }

    /// The Kafka producer, for the devices' acknowledgements.
    pub(super) fn producer(&self) -> Option<&ThreadedProducer<Counting>> {
        match self {
            Sink::Kafka { producer, .. } => Some(producer),
            _ => None,
        }
    }

    /// Sends one fleet record.
    pub(super) fn send(&mut self, key: &[u8], value: &[u8], topology: &Topology) -> Result<()> {
        match self {
            Sink::Kafka {
                producer, topic, ..
            } => {
                let mut record = BaseRecord::to(topic.as_str()).key(key).payload(value);
                loop {
                    match producer.send(record) {
                        Ok(()) => return Ok(()),
                        Err((e, r))
                            if e.rdkafka_error_code()
                                == Some(rdkafka::types::RDKafkaErrorCode::QueueFull) =>
                        {
                            record = r;
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        Err((e, _)) => return Err(e).context("producing a simulated record"),
                    }
                }
            }
            Sink::Http { batch, .. } => {
                if let Some(json) = reading_json(value, topology) {
                    batch.push(serde_json::Value::Object(json));
                }
                if batch.len() >= HTTP_BATCH {
                    self.post()?;
                }
                Ok(())
            }
            Sink::Mqtt { client, sent, .. } => {
                let asset = String::from_utf8_lossy(key).replace(['+', '#', '\0'], "_");
                let payload = match reading_json(value, topology) {
                    Some(mut json) => {
                        json.remove("asset_id");
                        serde_json::to_vec(&json).expect("JSON values serialize")
                    }
                    None => value.to_vec(),
                };
                client
                    .publish(
                        format!("assets/{asset}/telemetry"),
                        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                        false,
                        payload,
                    )
                    .context("publishing a simulated reading")?;
                *sent += 1;
                Ok(())
            }
        }
    }

    /// Posts the readings gathered so far: again after a 429 or 503 (their `Retry-After`),
    /// and without the invalid ones after a 400.
    fn post(&mut self) -> Result<()> {
        let Sink::Http {
            client,
            url,
            token,
            runtime,
            batch,
            failed,
        } = self
        else {
            return Ok(());
        };
        let mut attempts = 0;
        while !batch.is_empty() {
            attempts += 1;
            let body = serde_json::to_vec(&batch).expect("JSON values serialize");
            let answer = runtime.block_on(async {
                let r = client
                    .post(url.as_str())
                    .bearer_auth(token.as_str())
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await?;
                let status = r.status().as_u16();
                let retry = r
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
                let json: serde_json::Value = r.json().await.unwrap_or_default();
                Ok::<_, reqwest::Error>((status, retry, json))
            });
            match answer {
                Ok((202, _, _)) => batch.clear(),
                Ok((400, _, json)) if attempts < 3 => {
                    let invalid: Vec<usize> = json["invalid"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|p| p["index"].as_u64())
                        .map(|i| i as usize)
                        .collect();
                    let mut i = 0;
                    batch.retain(|_| {
                        i += 1;
                        !invalid.contains(&(i - 1))
                    });
                }
                Ok((429 | 503, retry, _)) if attempts < 10 => {
                    std::thread::sleep(Duration::from_secs(retry.unwrap_or(1).min(10)));
                }
                Ok((status, _, json)) => {
                    tracing::warn!(status, answer = %json, "Simulated readings not taken over HTTP.");
                    *failed += batch.len() as u64;
                    batch.clear();
                }
                Err(error) => {
                    tracing::warn!(%error, "Simulated readings not posted.");
                    if attempts >= 10 {
                        *failed += batch.len() as u64;
                        batch.clear();
                    } else {
                        std::thread::sleep(Duration::from_millis(500));
                    }
                }
            }
        }
        Ok(())
    }

    /// Sends what is still buffered and waits (30 s at most) until the door has it all;
    /// returns how many readings it did not take.
    pub(super) fn finish(mut self) -> Result<u64> {
        match &mut self {
            Sink::Kafka {
                producer, failed, ..
            } => {
                producer
                    .flush(Duration::from_secs(30))
                    .context("flushing the simulator's producer")?;
                Ok(failed.load(Ordering::Relaxed))
            }
            Sink::Http { .. } => {
                self.post()?;
                let Sink::Http { failed, .. } = self else {
                    unreachable!("an HTTP sink")
                };
                Ok(failed)
            }
            Sink::Mqtt {
                client,
                sent,
                acknowledged,
                closed,
            } => {
                let deadline = Instant::now() + Duration::from_secs(30);
                while acknowledged.load(Ordering::Relaxed) < *sent
                    && closed.load(Ordering::Relaxed) == 0
                    && Instant::now() < deadline
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                let _ = client.disconnect();
                Ok(sent.saturating_sub(acknowledged.load(Ordering::Relaxed)))
            }
        }
    }
}

/// The JSON a device sends for the Avro reading `value`; `None` when it does not decode.
fn reading_json(
    value: &[u8],
    topology: &Topology,
) -> Option<serde_json::Map<String, serde_json::Value>> {
    let mut reading = Reading::default();
    topology
        .codec
        .decode_reading(Format::Avro, value, &mut reading)
        .ok()?;
    Some(topology.codec.reading_json(&reading))
}
