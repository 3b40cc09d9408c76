//! What a device's MQTT message becomes: a reading on the telemetry topic, an
//! acknowledgement on the acknowledgement topic, or a dead letter with the reason.
//!
//! The asset id comes from the topic and must match `asset_id_pattern`; a reading that
//! names an asset in its payload must name the topic's (a device writes only as itself).
//! Field names are mapped through `field_map`, then the reading is decoded as JSON with the
//! model's schema (types checked) and written in the telemetry topic's format. Ranges,
//! times and the rest of the model's checks stay with the pipeline, which dead-letters
//! what fails them as for any other reading. An acknowledgement is passed on as sent, keyed
//! by the topic's asset id; the pipeline reads it.

use std::collections::BTreeMap;
use std::sync::Arc;

use regex::Regex;

use super::topic::TopicTemplate;
use crate::codec::Format;
use crate::config::MqttConfig;
use crate::error::{Error, Result};
use crate::metrics::DeadLetterReason;
use crate::topology::Topology;
use crate::twin::Reading;

/// Where a device's message goes.
#[derive(Debug, PartialEq)]
pub enum Routed {
    /// A reading for the telemetry topic, keyed by asset id.
    Reading {
        /// The asset id (the record key).
        asset_id: String,
        /// The record value, in the telemetry topic's format.
        value: Vec<u8>,
    },
    /// An acknowledgement for the acknowledgement topic, keyed by asset id.
    Ack {
        /// The asset id (the record key).
        asset_id: String,
    },
    /// Not a record: dead-letter it.
    Refused {
        /// The topic's asset id, if it named one.
        asset_id: Option<String>,
        /// Why, as counted.
        reason: DeadLetterReason,
        /// Why, for a person.
        message: String,
    },
}

/// The device side of the bridge's topics and the model.
pub struct Devices {
    telemetry: TopicTemplate,
    acks: TopicTemplate,
    pattern: Regex,
    field_map: BTreeMap<String, String>,
    topology: Arc<Topology>,
    format: Format,
    reading: Reading,
}

fn refused(asset_id: Option<&str>, reason: DeadLetterReason, message: String) -> Routed {
    Routed::Refused {
        asset_id: asset_id.map(str::to_owned),
        reason,
        message,
    }
}

impl Devices {
    /// The devices `config` describes, writing readings for `topology`.
    ///
    /// # Errors
    /// `Error::Config` for a telemetry topic in the Confluent format (the bridge writes
    /// Avro or JSON) or a bad template or pattern.
    pub fn new(config: &MqttConfig, topology: Arc<Topology>) -> Result<Devices> {
        let format = topology.topics.telemetry_format();
        if format == Format::ConfluentAvro {
            return Err(Error::Config(
                "the telemetry topic is confluent_avro: the MQTT bridge writes avro or json topics only"
                    .into(),
            ));
        }
        let template = |t: &str| TopicTemplate::parse(t).map_err(Error::Config);
        let pattern = Regex::new(&format!("^(?:{})$", config.asset_id_pattern))
            .map_err(|e| Error::Config(format!("ingest.mqtt.asset_id_pattern: {e}")))?;
        Ok(Devices {
            telemetry: template(&config.telemetry_topic)?,
            acks: template(&config.ack_topic)?,
            pattern,
            field_map: config.field_map.clone(),
            topology,
            format,
            reading: Reading::default(),
        })
    }

    /// The topic filters to subscribe to, shared by `group` unless it is empty.
    pub fn filters(&self, group: &str) -> [String; 2] {
        [self.telemetry.filter(group), self.acks.filter(group)]
    }

    /// Whether `topic` is a command acknowledgement topic.
    pub fn is_ack_topic(&self, topic: &str) -> bool {
        self.acks.asset_of(topic).is_some()
    }

    /// Where the message on `topic` with `payload` goes.
    pub fn route(&mut self, topic: &str, payload: &[u8]) -> Routed {
        let (asset_id, is_reading) =
            match (self.telemetry.asset_of(topic), self.acks.asset_of(topic)) {
                (Some(id), _) => (id, true),
                (None, Some(id)) => (id, false),
                (None, None) => {
                    return refused(
                        None,
                        DeadLetterReason::Identity,
                        format!("topic '{}' is none of the bridge's", cut(topic)),
                    );
                }
            };
        if !self.pattern.is_match(asset_id) {
            return refused(
                None,
                DeadLetterReason::Identity,
                format!(
                    "asset id '{}' of the topic does not match asset_id_pattern",
                    cut(asset_id)
                ),
            );
        }
        if payload.is_empty() {
            return refused(
                Some(asset_id),
                DeadLetterReason::Empty,
                "empty payload".into(),
            );
        }
        if !is_reading {
            return Routed::Ack {
                asset_id: asset_id.to_owned(),
            };
        }
        match self.reading_value(asset_id, payload) {
            Ok(value) => Routed::Reading {
                asset_id: asset_id.to_owned(),
                value,
            },
            Err((reason, message)) => refused(Some(asset_id), reason, message),
        }
    }

    fn reading_value(
        &mut self,
        asset_id: &str,
        payload: &[u8],
    ) -> std::result::Result<Vec<u8>, (DeadLetterReason, String)> {
        let decode = |why: String| (DeadLetterReason::Decode, why);
        let mut object: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(payload)
                .map_err(|e| decode(format!("not a JSON object: {e}")))?;
        for (from, to) in &self.field_map {
            if let Some(v) = object.remove(from) {
                object.insert(to.clone(), v);
            }
        }
        match object.get("asset_id") {
            None => {
                object.insert("asset_id".into(), asset_id.into());
            }
            Some(serde_json::Value::String(s)) if s == asset_id => {}
            Some(other) => {
                let named = other.to_string();
                return Err((
                    DeadLetterReason::Identity,
                    format!(
                        "the payload's asset_id {} is not the topic's '{asset_id}'",
                        cut(&named)
                    ),
                ));
            }
        }
        let json = serde_json::to_vec(&object).expect("JSON values serialize");
        self.topology
            .codec
            .decode_reading(Format::Json, &json, &mut self.reading)
            .map_err(|e| decode(e.to_string()))?;
        Ok(match self.format {
            Format::Json => json,
            _ => {
                let mut avro = Vec::with_capacity(json.len());
                self.topology.codec.encode_reading(&self.reading, &mut avro);
                avro
            }
        })
    }
}

/// A quoted piece of hostile input, at most 128 bytes of it.
fn cut(s: &str) -> &str {
    let mut end = s.len().min(128);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
