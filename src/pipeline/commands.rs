//! Commands: inputs that act on twins instead of reporting readings, keyed by asset id.
//!
//! - Acknowledgements (JSON), of an alert: `{"alert_id": "...", "by": "..."}`; of a command,
//!   by the device: `{"command_id": "...", "result": "accepted|rejected|done", "detail": "..."}`.
//! - Desired-state writes (JSON, or Avro of `schemas/desired_write.avsc`): a JSON Merge Patch
//!   of the desired values, `{"desired": {"<property>": <value or null>}, "if_match": 3,
//!   "command_id": "...", "by": "..."}`.

use std::sync::LazyLock;

use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::types::Value as AvroValue;
use apache_avro::writer::datum::GenericDatumWriter;

use super::input::Input;
use crate::codec::{DESIRED_WRITE_SCHEMA, Format};
use crate::metrics::DeadLetterReason;
use crate::twin::{DesiredWrite, DeviceResult, Model, PropKind, Value, command_id};

/// An acknowledgement of an alert.
#[derive(Debug, serde::Deserialize)]
pub struct Ack {
    /// The alert's id, from its RAISED event.
    pub alert_id: String,
    /// Who acknowledges it, as they say.
    pub by: Option<String>,
}

/// A device's acknowledgement of a command.
#[derive(Debug, serde::Deserialize)]
pub struct DeviceAck {
    /// The command's id, from the command record.
    pub command_id: String,
    /// What the device did with it.
    pub result: DeviceResult,
    /// Why, in the device's words.
    pub detail: Option<String>,
}

/// A record of the acknowledgement input.
#[derive(Debug, serde::Deserialize)]
#[serde(untagged)]
pub enum AckRecord {
    /// Of an alert.
    Alert(Ack),
    /// Of a command.
    Command(DeviceAck),
}

/// Why a record is not a command (to dead-letter it).
pub type Refusal = (DeadLetterReason, String);

/// The asset id of a command record: its key, which must be a non-empty UTF-8 string.
fn asset_id<'a>(input: &Input<'a>) -> Result<&'a str, Refusal> {
    input
        .key
        .and_then(|k| std::str::from_utf8(k).ok())
        .filter(|id| !id.is_empty() && id.len() <= crate::twin::MAX_ASSET_ID_BYTES)
        .ok_or_else(|| {
            (
                DeadLetterReason::KeyMismatch,
                "the key must be the asset id".to_owned(),
            )
        })
}

/// The asset id and acknowledgement of an input record.
///
/// # Errors
/// Why it is not one: no value or not one of the JSON objects (`decode`), or a key that is
/// not an asset id (`key_mismatch`).
pub fn decode_ack<'a>(input: &Input<'a>) -> Result<(&'a str, AckRecord), Refusal> {
    let ack = input
        .payload
        .ok_or_else(|| "record has no value".to_owned())
        .and_then(|p| serde_json::from_slice::<AckRecord>(p).map_err(|e| e.to_string()))
        .map_err(|why| {
            (
                DeadLetterReason::Decode,
                format!(
                    "not an acknowledgement ({{\"alert_id\": ..., \"by\": ...}} or \
                     {{\"command_id\": ..., \"result\": \"accepted|rejected|done\", \"detail\": ...}}): {why}"
                ),
            )
        })?;
    Ok((asset_id(input)?, ack))
}

/// The fields of a desired-state write, before they are checked against the model.
#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteRecord {
    /// Property name to value; null removes.
    pub desired: serde_json::Map<String, serde_json::Value>,
    /// Optimistic concurrency: the `desired_version` the writer saw.
    #[serde(default)]
    pub if_match: Option<i64>,
    /// The command's id, if the writer gives one.
    #[serde(default)]
    pub command_id: Option<String>,
    /// Who writes.
    #[serde(default)]
    pub by: Option<String>,
}

/// A record of the desired-state input.
#[derive(Debug)]
pub enum DesiredRecord {
    /// A write of desired values.
    Write(DesiredWrite),
    /// A control record deleting the twin; who sent it.
    Delete(String),
}

/// Longest `twinflow.control.by` kept, in bytes.
const MAX_CONTROL_BY: usize = 256;

/// The control header's value and who sent it, when the record has the control header.
fn control(input: &Input<'_>) -> Option<(Option<Vec<u8>>, String)> {
    let headers = input.headers?;
    let (mut control, mut by) = (None, String::new());
    headers.each(&mut |name, value| {
        if name == crate::headers::CONTROL.as_bytes() {
            control = Some(value.map(<[u8]>::to_vec));
        } else if name == crate::headers::CONTROL_BY.as_bytes() {
            let v = String::from_utf8_lossy(value.unwrap_or_default());
            let mut end = v.len().min(MAX_CONTROL_BY);
            while !v.is_char_boundary(end) {
                end -= 1;
            }
            by = v[..end].to_owned();
        }
    });
    control.map(|c| (c, by))
}

/// The asset id and write (or control record) of a record of the desired-state input of
/// `partition`, checked against `model`. A write without a command id gets one derived
/// from the record's place.
///
/// # Errors
/// Why it is not a valid write: not decodable (`decode`), a key that is not an asset id
/// (`key_mismatch`), values the model refuses or an unknown control (`invalid`).
pub fn decode_desired<'a>(
    input: &Input<'a>,
    format: Format,
    model: &Model,
    partition: i32,
) -> Result<(&'a str, DesiredRecord), Refusal> {
    if let Some((control, by)) = control(input) {
        let id = asset_id(input)?;
        return match control.as_deref() {
            Some(b"delete") => Ok((id, DesiredRecord::Delete(by))),
            other => Err((
                DeadLetterReason::Invalid,
                format!(
                    "unknown control {:?}: the one control is twinflow.control: delete",
                    other.map(String::from_utf8_lossy)
                ),
            )),
        };
    }
    let payload = input
        .payload
        .ok_or_else(|| (DeadLetterReason::Empty, "record has no value".to_owned()))?;
    let record = match format {
        Format::Avro => avro_write(payload),
        _ => serde_json::from_slice::<WriteRecord>(payload).map_err(|e| e.to_string()),
    }
    .map_err(|why| {
        let why = format!("not a desired-state write ({{\"desired\": {{...}}, ...}}): {why}");
        (DeadLetterReason::Decode, why)
    })?;
    let id = asset_id(input)?;
    let command_id = record
        .command_id
        .clone()
        .unwrap_or_else(|| command_id(id, input.topic, partition, input.offset));
    let write =
        desired_write(model, record, command_id).map_err(|why| (DeadLetterReason::Invalid, why))?;
    Ok((id, DesiredRecord::Write(write)))
}

/// A write of the given fields, checked against `model`: the one check of desired values,
/// for the input and for the HTTP API.
///
/// # Errors
/// A message naming the property the model refuses.
pub fn desired_write(
    model: &Model,
    record: WriteRecord,
    command_id: String,
) -> Result<DesiredWrite, String> {
    let mut values = Vec::with_capacity(record.desired.len());
    for (name, value) in &record.desired {
        let index = model
            .property(name)
            .ok_or_else(|| format!("{name} is not a property of the model"))?;
        values.push((
            index,
            json_value(value, model.properties[index].kind, name)?,
        ));
    }
    values.sort_by_key(|(index, _)| *index);
    let write = DesiredWrite {
        command_id,
        values,
        if_match: record.if_match,
        by: record.by.unwrap_or_default(),
    };
    model.validate_desired(&write)?;
    Ok(write)
}

/// A JSON value as a value of a property of `kind`; null is `None`.
fn json_value(v: &serde_json::Value, kind: PropKind, name: &str) -> Result<Option<Value>, String> {
    use serde_json::Value as J;
    Ok(Some(match (v, kind) {
        (J::Null, _) => return Ok(None),
        (J::Number(n), PropKind::Double | PropKind::Float) => Value::Double(
            n.as_f64()
                .ok_or_else(|| format!("{name}: {n} is not a number"))?,
        ),
        (J::Number(n), PropKind::Long | PropKind::Int) => Value::Long(
            n.as_i64()
                .ok_or_else(|| format!("{name}: {n} is not a whole number"))?,
        ),
        (J::Bool(b), PropKind::Bool) => Value::Bool(*b),
        (J::String(s), PropKind::Str) => Value::Str(s.as_str().into()),
        _ => {
            return Err(format!(
                "{name} takes a {} value, not {v}",
                kind.avro_name()
            ));
        }
    }))
}

/// The bytes of `record` on the desired-state topic in `format` (JSON unless Avro): what
/// the HTTP API writes.
pub fn encode_write(record: &WriteRecord, format: Format) -> Vec<u8> {
    if format != Format::Avro {
        return serde_json::to_vec(&serde_json::json!({
            "desired": record.desired,
            "if_match": record.if_match,
            "command_id": record.command_id,
            "by": record.by,
        }))
        .expect("JSON values serialize");
    }
    let union = |branch: u32, v: AvroValue| AvroValue::Union(branch, Box::new(v));
    let optional = |v: Option<AvroValue>| match v {
        Some(v) => union(1, v),
        None => union(0, AvroValue::Null),
    };
    let desired = record
        .desired
        .iter()
        .map(|(name, v)| {
            let v = match v {
                serde_json::Value::Bool(b) => union(3, AvroValue::Boolean(*b)),
                serde_json::Value::String(s) => union(4, AvroValue::String(s.clone())),
                serde_json::Value::Number(n) => match n.as_i64() {
                    Some(l) => union(2, AvroValue::Long(l)),
                    None => union(1, AvroValue::Double(n.as_f64().unwrap_or(f64::NAN))),
                },
                _ => union(0, AvroValue::Null),
            };
            (name.clone(), v)
        })
        .collect();
    let value = AvroValue::Record(vec![
        ("desired".into(), AvroValue::Map(desired)),
        (
            "if_match".into(),
            optional(record.if_match.map(AvroValue::Long)),
        ),
        (
            "command_id".into(),
            optional(record.command_id.clone().map(AvroValue::String)),
        ),
        (
            "by".into(),
            optional(record.by.clone().map(AvroValue::String)),
        ),
    ]);
    GenericDatumWriter::builder(&WRITE_SCHEMA)
        .build()
        .and_then(|w| w.write_value_to_vec(value))
        .expect("a write record fits its schema")
}

/// `schemas/desired_write.avsc`.
static WRITE_SCHEMA: LazyLock<apache_avro::Schema> = LazyLock::new(|| {
    apache_avro::Schema::parse_str(DESIRED_WRITE_SCHEMA).expect("desired_write.avsc parses")
});

/// Reads an Avro datum of `schemas/desired_write.avsc` into the JSON form.
fn avro_write(payload: &[u8]) -> Result<WriteRecord, String> {
    let mut reader = payload;
    let value = GenericDatumReader::builder(&WRITE_SCHEMA)
        .build()
        .and_then(|r| r.read_value(&mut reader))
        .map_err(|e| e.to_string())?;
    if !reader.is_empty() {
        return Err(format!("{} bytes left after the datum", reader.len()));
    }
    let AvroValue::Record(fields) = value else {
        return Err("not a record".into());
    };
    let mut record = WriteRecord::default();
    for (name, value) in fields {
        let value = match value {
            AvroValue::Union(_, inner) => *inner,
            other => other,
        };
        match (name.as_str(), value) {
            ("desired", AvroValue::Map(map)) => {
                for (property, v) in map {
                    let v = match v {
                        AvroValue::Union(_, inner) => *inner,
                        other => other,
                    };
                    let json = match v {
                        AvroValue::Null => serde_json::Value::Null,
                        AvroValue::Double(d) => serde_json::json!(d),
                        AvroValue::Long(l) => serde_json::json!(l),
                        AvroValue::Boolean(b) => serde_json::json!(b),
                        AvroValue::String(s) => serde_json::json!(s),
                        other => return Err(format!("desired.{property}: {other:?}")),
                    };
                    record.desired.insert(property, json);
                }
            }
            ("if_match", AvroValue::Long(v)) => record.if_match = Some(v),
            ("command_id", AvroValue::String(s)) => record.command_id = Some(s),
            ("by", AvroValue::String(s)) => record.by = Some(s),
            (_, AvroValue::Null) => {}
            (field, other) => return Err(format!("field {field}: {other:?}")),
        }
    }
    Ok(record)
}
