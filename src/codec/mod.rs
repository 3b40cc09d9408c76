//! Encoding and decoding: telemetry in (Avro or JSON), twins and alert events out (Avro), and
//! JSON views of twins for the HTTP API.
//!
//! Avro goes through plans built once from the model's schemas (see [`schema`]): the hot path
//! reads and writes bytes directly, with no generic `Value` tree and no allocation beyond the
//! output buffer and string properties. Tests check every byte against the reference
//! `apache-avro` crate. Values are plain Avro datums without a Confluent header; keys are the
//! asset id as UTF-8, so any Avro library reads the topics with just the files in `schemas/`.
//!
//! This module knows nothing of Kafka or RocksDB.

pub mod avro;
pub mod confluent;
mod desired;
mod forecast;
mod schema;

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use apache_avro::Schema;
use serde::Deserialize;

use confluent::WriterSchemas;
pub use desired::{
    CommandRecord, DESIRED_FIELDS, decode_command, encode_command, encode_command_event,
};
pub use schema::SchemaProperty;
use schema::{Plans, PropType, ReadingField, TimeUnit, TwinField};

use crate::error::{Error, Result};
use crate::rules::{AlertEvent, RuleSet};
use crate::twin::{
    ActiveAlert, PendingAlert, Prop, PropKind, Reading, Severity, Status, Twin, Value,
};
use avro::{Cursor, put_bool, put_double, put_float, put_long, put_str};

/// The wire format of an input topic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// A plain Avro datum written with the model's schema.
    #[default]
    Avro,
    /// The Confluent wire format: magic byte, schema registry id, Avro datum. On input, the
    /// writer schema is looked up by id and resolved against the model's; on output, the
    /// model's schema is registered under `<topic>-value`.
    ConfluentAvro,
    /// One JSON object with the telemetry schema's field names (input only).
    Json,
}

/// The schema of alert events; fixed for every model.
pub const ALERT_SCHEMA: &str = include_str!("../../schemas/alert_event.avsc");

/// The schema of commands for devices; fixed for every model.
pub const COMMAND_SCHEMA: &str = include_str!("../../schemas/command.avsc");

/// The schema of command events; fixed for every model.
pub const COMMAND_EVENT_SCHEMA: &str = include_str!("../../schemas/command_event.avsc");

/// The schema of desired-state writes in Avro; fixed for every model.
pub const DESIRED_WRITE_SCHEMA: &str = include_str!("../../schemas/desired_write.avsc");

/// Encoders and decoders for one model.
#[derive(Clone, Debug)]
pub struct Codec {
    plans: Plans,
    by_name: HashMap<String, usize, foldhash::fast::RandomState>,
    telemetry_schema: Schema,
    twin_schema: Schema,
    alert_schema: Schema,
    /// The schemas' JSON text, as registered.
    texts: (String, String),
    /// Registry schemas seen on Confluent-framed input and changelog records.
    writers: WriterSchemas,
    /// Registry ids of the twin and alert schemas when those topics use the Confluent format
    /// (set once, at start, before any record is processed). Shared by every clone, like
    /// the writer schemas: a clone taken before the ids are set frames its outputs too.
    output_ids: Arc<OnceLock<(Option<u32>, Option<u32>)>>,
}

fn decode_err(field: &str, e: String) -> Error {
    Error::Decode(format!("field '{field}': {e}"))
}

impl Codec {
    /// Builds the codec from the telemetry and twin schemas (JSON text).
    ///
    /// # Errors
    /// `Error::Config` when the schemas cannot describe a twin (see [`schema`]).
    pub fn new(telemetry_schema: &str, twin_schema: &str) -> Result<Codec> {
        let plans = Plans::build(telemetry_schema, twin_schema)?;
        let by_name = plans
            .properties
            .iter()
            .enumerate()
            .map(|(i, p)| (p.name.clone(), i))
            .collect();
        let parse = |text| Schema::parse_str(text).map_err(|e| Error::Config(e.to_string()));
        Ok(Codec {
            plans,
            by_name,
            telemetry_schema: parse(telemetry_schema)?,
            twin_schema: parse(twin_schema)?,
            alert_schema: parse(ALERT_SCHEMA)?,
            texts: (telemetry_schema.to_owned(), twin_schema.to_owned()),
            writers: WriterSchemas::default(),
            output_ids: Arc::default(),
        })
    }

    /// The model's telemetry and twin schemas.
    pub fn schemas(&self) -> (&Schema, &Schema) {
        (&self.telemetry_schema, &self.twin_schema)
    }

    /// The model's telemetry and twin schemas as JSON text.
    pub fn schema_texts(&self) -> (&str, &str) {
        (&self.texts.0, &self.texts.1)
    }

    /// Registry schemas by id, for Confluent-framed input and changelog records.
    pub fn writers(&self) -> &WriterSchemas {
        &self.writers
    }

    /// Frames changelog and alert values in the Confluent wire format with these registry
    /// ids (`None`: plain Avro datums).
    /// Only the first call counts.
    pub fn set_output_ids(&self, changelog: Option<u32>, alerts: Option<u32>) {
        let _ = self.output_ids.set((changelog, alerts));
    }

    fn changelog_id(&self) -> Option<u32> {
        self.output_ids.get().and_then(|ids| ids.0)
    }

    /// The bytes that go before each changelog value: the Confluent header, or nothing.
    pub fn changelog_header(&self) -> Option<[u8; 5]> {
        self.changelog_id().map(confluent::header)
    }

    /// The bytes that go before each alert value: the Confluent header, or nothing.
    pub fn alerts_header(&self) -> Option<[u8; 5]> {
        self.output_ids
            .get()
            .and_then(|ids| ids.1)
            .map(confluent::header)
    }

    /// The writer of a Confluent-framed value, or `Error::SchemaNeeded` when its id has not
    /// been fetched from the registry yet.
    fn framed<'a>(&self, bytes: &'a [u8]) -> Result<(u32, Arc<confluent::Writer>, &'a [u8])> {
        let (id, datum) = confluent::split(bytes)?;
        let writer = self.writers.get(id).ok_or(Error::SchemaNeeded(id))?;
        Ok((id, writer, datum))
    }

    /// The model's properties, in telemetry schema order.
    pub fn properties(&self) -> &[SchemaProperty] {
        &self.plans.properties
    }

    fn name(&self, index: usize) -> &str {
        &self.plans.properties[index].name
    }

    /// Decodes one input record into `out` (cleared first).
    ///
    /// # Errors
    /// `Error::Decode` saying which field was wrong and how.
    pub fn decode_reading(&self, format: Format, bytes: &[u8], out: &mut Reading) -> Result<()> {
        out.clear();
        match format {
            Format::Avro => self.decode_avro_reading(bytes, out),
            Format::Json => self.decode_json_reading(bytes, out),
            Format::ConfluentAvro => {
                let (id, writer, datum) = self.framed(bytes)?;
                match &writer.telemetry {
                    confluent::Reading::Direct => self.decode_avro_reading(datum, out),
                    confluent::Reading::Resolve(w) => {
                        let own = confluent::resolve(datum, w, &self.telemetry_schema)
                            .map_err(|e| Error::Decode(format!("schema id {id}: {e}")))?;
                        self.decode_avro_reading(&own, out)
                    }
                    confluent::Reading::Unreadable(why) => {
                        Err(Error::Decode(format!("schema id {id}: {why}")))
                    }
                }
            }
        }
    }

    /// A changelog value in the form the store keeps: the model's plain twin datum (the
    /// Confluent header stripped, an older writer schema resolved).
    ///
    /// # Errors
    /// As [`Codec::decode_changelog_twin`].
    pub fn stored_twin<'a>(&self, value: &'a [u8]) -> Result<std::borrow::Cow<'a, [u8]>> {
        let Some(own) = self.changelog_id() else {
            return Ok(value.into());
        };
        let (id, datum) = confluent::split(value)?;
        if id == own {
            return Ok(datum.into());
        }
        let mut buf = Vec::new();
        self.encode_twin(&self.decode_changelog_twin(value)?, &mut buf);
        Ok(buf.into())
    }

    /// Decodes a changelog value: a twin, Confluent-framed when the changelog is.
    ///
    /// # Errors
    /// `Error::Decode` when it is not a twin of this model; `Error::SchemaNeeded` when its
    /// registry id has not been fetched yet.
    pub fn decode_changelog_twin(&self, bytes: &[u8]) -> Result<Twin> {
        let Some(own) = self.changelog_id() else {
            return self.decode_twin(bytes);
        };
        let (id, datum) = confluent::split(bytes)?;
        if id == own {
            return self.decode_twin(datum);
        }
        let (_, writer, datum) = self.framed(bytes)?;
        match &writer.twin {
            confluent::Reading::Direct => self.decode_twin(datum),
            confluent::Reading::Resolve(w) => self.decode_twin(
                &confluent::resolve(datum, w, &self.twin_schema)
                    .map_err(|e| Error::Decode(format!("schema id {id}: {e}")))?,
            ),
            confluent::Reading::Unreadable(why) => {
                Err(Error::Decode(format!("schema id {id}: {why}")))
            }
        }
    }

    fn decode_avro_reading(&self, bytes: &[u8], out: &mut Reading) -> Result<()> {
        let mut c = Cursor::new(bytes);
        for field in &self.plans.reading {
            match field {
                ReadingField::AssetId => {
                    let s = c.str().map_err(|e| decode_err("asset_id", e))?;
                    out.asset_id.push_str(s);
                }
                ReadingField::EventTime(unit) => {
                    let t = c.long().map_err(|e| decode_err("event_time", e))?;
                    out.event_time = match unit {
                        TimeUnit::Millis => t,
                        TimeUnit::Micros => t.div_euclid(1000),
                    };
                }
                ReadingField::Property(index, ty) => {
                    if let Some(v) =
                        read_prop(&mut c, *ty).map_err(|e| decode_err(self.name(*index), e))?
                    {
                        out.values.push((*index, v));
                    }
                }
            }
        }
        if c.remaining() != 0 {
            return Err(Error::Decode(format!(
                "{} bytes left after the record: not written with the telemetry schema",
                c.remaining()
            )));
        }
        Ok(())
    }

    fn decode_json_reading(&self, bytes: &[u8], out: &mut Reading) -> Result<()> {
        let object: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(bytes)
            .map_err(|e| Error::Decode(format!("not a JSON object: {e}")))?;
        let mut has_time = false;
        for (key, value) in &object {
            match key.as_str() {
                "asset_id" => match value {
                    serde_json::Value::String(s) => out.asset_id.push_str(s),
                    _ => return Err(decode_err("asset_id", "must be a string".into())),
                },
                "event_time" => {
                    out.event_time = json_time(value).map_err(|e| decode_err("event_time", e))?;
                    has_time = true;
                }
                name => {
                    // Unknown keys are ignored, as Avro resolution ignores unknown writer fields.
                    let Some(&index) = self.by_name.get(name) else {
                        continue;
                    };
                    if let Some(v) = json_prop(value, self.plans.properties[index].kind)
                        .map_err(|e| decode_err(name, e))?
                    {
                        out.values.push((index, v));
                    }
                }
            }
        }
        if out.asset_id.is_empty() && !object.contains_key("asset_id") {
            return Err(decode_err("asset_id", "missing".into()));
        }
        if !has_time {
            return Err(decode_err("event_time", "missing".into()));
        }
        out.values.sort_by_key(|(i, _)| *i);
        Ok(())
    }

    /// Appends `reading` as an Avro telemetry datum: what devices and the simulator write.
    pub fn encode_reading(&self, reading: &Reading, buf: &mut Vec<u8>) {
        for field in &self.plans.reading {
            match field {
                ReadingField::AssetId => put_str(buf, &reading.asset_id),
                ReadingField::EventTime(TimeUnit::Millis) => put_long(buf, reading.event_time),
                ReadingField::EventTime(TimeUnit::Micros) => {
                    put_long(buf, reading.event_time * 1000)
                }
                ReadingField::Property(index, ty) => {
                    let value = reading
                        .values
                        .iter()
                        .find(|(i, _)| i == index)
                        .map(|(_, v)| v);
                    write_prop(buf, *ty, value);
                }
            }
        }
    }

    /// Appends `twin` as an Avro datum of the twin schema: the changelog value and the stored
    /// form of a twin.
    pub fn encode_twin(&self, twin: &Twin, buf: &mut Vec<u8>) {
        for field in &self.plans.twin {
            match field {
                TwinField::AssetId => put_str(buf, &twin.asset_id),
                TwinField::Version => put_long(buf, twin.version),
                TwinField::EventTime => put_long(buf, twin.event_time),
                TwinField::LastSeen => put_long(buf, twin.last_seen),
                TwinField::UpdatedAt => put_long(buf, twin.updated_at),
                TwinField::StillSince => put_opt_long(buf, twin.still_since),
                TwinField::PendingAlerts => {
                    if !twin.pending.is_empty() {
                        put_long(buf, twin.pending.len() as i64);
                        for p in &twin.pending {
                            put_str(buf, &p.code);
                            put_long(buf, p.since);
                        }
                    }
                    put_long(buf, 0);
                }
                TwinField::Status(symbols) => put_long(buf, symbols[status_index(twin.status)]),
                TwinField::Property(index, ty) => {
                    write_prop(buf, *ty, twin.props[*index].as_ref().map(|p| &p.value))
                }
                TwinField::PropertyTimes => {
                    let known = twin.props.iter().filter(|p| p.is_some()).count();
                    if known > 0 {
                        put_long(buf, known as i64);
                        for (index, prop) in twin.props.iter().enumerate() {
                            if let Some(prop) = prop {
                                put_str(buf, self.name(index));
                                put_long(buf, prop.time);
                            }
                        }
                    }
                    put_long(buf, 0);
                }
                TwinField::ActiveAlerts(severities) => {
                    if !twin.alerts.is_empty() {
                        put_long(buf, twin.alerts.len() as i64);
                        for a in &twin.alerts {
                            put_str(buf, &a.alert_id);
                            put_str(buf, &a.code);
                            put_long(buf, severities[severity_index(a.severity)]);
                            put_double(buf, a.value);
                            put_double(buf, a.threshold);
                            put_long(buf, a.raised_at);
                            put_opt_long(buf, a.acknowledged_at);
                            put_opt_str(buf, a.acknowledged_by.as_deref());
                        }
                    }
                    put_long(buf, 0);
                }
                TwinField::Desired(f) => desired::put(buf, *f, twin, &|i| self.name(i)),
                TwinField::Forecasts => forecast::put(buf, twin),
            }
        }
    }

    /// Whether the twin schema has the `forecasts` field a forecast rule needs.
    pub fn has_forecasts(&self) -> bool {
        self.plans.twin.contains(&TwinField::Forecasts)
    }

    /// Whether the twin schema has the desired-state fields (see [`DESIRED_FIELDS`]).
    pub fn has_desired(&self) -> bool {
        self.plans
            .twin
            .iter()
            .any(|f| matches!(f, TwinField::Desired(_)))
    }

    /// Decodes a twin written by [`Codec::encode_twin`] (from the store or the changelog).
    ///
    /// # Errors
    /// `Error::Decode` when the bytes are not a twin of this model.
    pub fn decode_twin(&self, bytes: &[u8]) -> Result<Twin> {
        let mut c = Cursor::new(bytes);
        let mut twin = Twin::blank(String::new(), self.plans.properties.len());
        let mut times: Vec<(usize, i64)> = Vec::new();
        for (i, field) in self.plans.twin.iter().enumerate() {
            if i >= self.plans.twin_tail && c.remaining() == 0 {
                break; // written before the remaining optional fields were added
            }
            let ctx = |name: &'static str| move |e: String| decode_err(name, e);
            match field {
                TwinField::AssetId => twin.asset_id = c.str().map_err(ctx("asset_id"))?.to_owned(),
                TwinField::Version => twin.version = c.long().map_err(ctx("version"))?,
                TwinField::EventTime => twin.event_time = c.long().map_err(ctx("event_time"))?,
                TwinField::LastSeen => twin.last_seen = c.long().map_err(ctx("last_seen"))?,
                TwinField::UpdatedAt => twin.updated_at = c.long().map_err(ctx("updated_at"))?,
                TwinField::StillSince => {
                    twin.still_since = opt_long(&mut c).map_err(ctx("still_since"))?;
                }
                TwinField::PendingAlerts => loop {
                    let n = c.block_count().map_err(ctx("pending_alerts"))?;
                    if n == 0 {
                        break;
                    }
                    for _ in 0..n {
                        let code = c.str().map_err(ctx("pending_alerts"))?.to_owned();
                        let since = c.long().map_err(ctx("pending_alerts"))?;
                        twin.pending.push(PendingAlert { code, since });
                    }
                },
                TwinField::Status(symbols) => {
                    let s = c.long().map_err(ctx("status"))?;
                    let at = symbols
                        .iter()
                        .position(|x| *x == s)
                        .ok_or_else(|| decode_err("status", format!("unknown symbol {s}")))?;
                    twin.status = Status::ALL[at];
                }
                TwinField::Property(index, ty) => {
                    let v = read_prop(&mut c, *ty).map_err(|e| decode_err(self.name(*index), e))?;
                    twin.props[*index] = v.map(|value| Prop { value, time: 0 });
                }
                TwinField::PropertyTimes => {
                    // `encode_twin` writes them in property order: look further on first.
                    let mut next = 0;
                    loop {
                        let n = c.block_count().map_err(ctx("property_times"))?;
                        if n == 0 {
                            break;
                        }
                        for _ in 0..n {
                            let name = c.str().map_err(ctx("property_times"))?;
                            let t = c.long().map_err(ctx("property_times"))?;
                            let index = (next..self.plans.properties.len())
                                .find(|&i| self.plans.properties[i].name == name)
                                .or_else(|| self.by_name.get(name).copied());
                            if let Some(index) = index {
                                times.push((index, t));
                                next = index + 1;
                            }
                        }
                    }
                }
                TwinField::ActiveAlerts(severities) => loop {
                    let n = c.block_count().map_err(ctx("active_alerts"))?;
                    if n == 0 {
                        break;
                    }
                    for _ in 0..n {
                        let alert_id = c.str().map_err(ctx("active_alerts"))?.to_owned();
                        let code = c.str().map_err(ctx("active_alerts"))?.to_owned();
                        let s = c.long().map_err(ctx("active_alerts"))?;
                        let at = severities
                            .iter()
                            .position(|x| *x == s)
                            .ok_or_else(|| decode_err("severity", format!("unknown symbol {s}")))?;
                        twin.alerts.push(ActiveAlert {
                            alert_id,
                            code,
                            severity: Severity::ALL[at],
                            value: c.double().map_err(ctx("active_alerts"))?,
                            threshold: c.double().map_err(ctx("active_alerts"))?,
                            raised_at: c.long().map_err(ctx("active_alerts"))?,
                            acknowledged_at: opt_long(&mut c).map_err(ctx("active_alerts"))?,
                            acknowledged_by: opt_str(&mut c).map_err(ctx("active_alerts"))?,
                        });
                    }
                },
                TwinField::Desired(f) => {
                    let index = |name: &str| self.by_name.get(name).copied();
                    desired::read(&mut c, *f, &mut twin, &index).map_err(ctx("desired state"))?;
                }
                TwinField::Forecasts => {
                    forecast::read(&mut c, &mut twin).map_err(ctx("forecasts"))?;
                }
            }
        }
        if c.remaining() != 0 {
            return Err(Error::Decode(format!(
                "{} bytes left after the twin",
                c.remaining()
            )));
        }
        for (index, t) in times {
            if let Some(p) = twin.props[index].as_mut() {
                p.time = t;
            }
        }
        Ok(twin)
    }

    /// A reading as a device sends it in JSON: `asset_id`, `event_time` (epoch ms) and each
    /// property it carries.
    pub fn reading_json(&self, reading: &Reading) -> serde_json::Map<String, serde_json::Value> {
        let mut o = serde_json::Map::new();
        o.insert("asset_id".into(), reading.asset_id.as_str().into());
        o.insert("event_time".into(), reading.event_time.into());
        for (index, value) in &reading.values {
            o.insert(self.name(*index).to_owned(), value_json(value));
        }
        o
    }

    /// The twin as JSON, with the same field names as the twin schema and RFC 3339 times.
    pub fn twin_json(&self, twin: &Twin) -> serde_json::Value {
        let mut properties = serde_json::Map::new();
        let mut times = serde_json::Map::new();
        for (index, prop) in twin.props.iter().enumerate() {
            let name = self.name(index).to_owned();
            match prop {
                Some(p) => {
                    properties.insert(name.clone(), value_json(&p.value));
                    times.insert(name, rfc3339(p.time).into());
                }
                None => {
                    properties.insert(name, serde_json::Value::Null);
                }
            }
        }
        let alerts: Vec<_> = twin
            .alerts
            .iter()
            .map(|a| {
                serde_json::json!({
                    "alert_id": a.alert_id, "code": a.code, "severity": a.severity,
                    "value": a.value, "threshold": a.threshold, "raised_at": rfc3339(a.raised_at),
                    "acknowledged_at": a.acknowledged_at.map(rfc3339),
                    "acknowledged_by": a.acknowledged_by,
                })
            })
            .collect();
        let number = |name: &str| {
            let index = *self.by_name.get(name)?;
            twin.props[index].as_ref()?.value.as_f64()
        };
        let location = match (number("lat"), number("lng")) {
            (Some(lat), Some(lng)) => serde_json::json!({ "lat": lat, "lng": lng }),
            _ => serde_json::Value::Null,
        };
        let pending: Vec<serde_json::Value> = twin
            .pending
            .iter()
            .map(|p| serde_json::json!({ "code": p.code, "since": rfc3339(p.since) }))
            .collect();
        // Built by moving each part in: `json!` would copy the maps and lists again.
        let mut o = serde_json::Map::new();
        o.insert("asset_id".into(), twin.asset_id.as_str().into());
        o.insert("version".into(), twin.version.into());
        o.insert("location".into(), location);
        o.insert("event_time".into(), rfc3339(twin.event_time).into());
        o.insert("last_seen".into(), rfc3339(twin.last_seen).into());
        o.insert("updated_at".into(), rfc3339(twin.updated_at).into());
        o.insert("still_since".into(), twin.still_since.map(rfc3339).into());
        o.insert("status".into(), twin.status.symbol().into());
        o.insert("properties".into(), serde_json::Value::Object(properties));
        o.insert("property_times".into(), serde_json::Value::Object(times));
        o.insert("active_alerts".into(), serde_json::Value::Array(alerts));
        o.insert("pending_alerts".into(), serde_json::Value::Array(pending));
        let mut json = serde_json::Value::Object(o);
        if self.has_desired() {
            self.desired_json(twin, &mut json);
        }
        json
    }

    /// Adds the twin's desired state to its JSON view.
    fn desired_json(&self, twin: &Twin, json: &mut serde_json::Value) {
        let desired: serde_json::Map<_, _> = twin
            .desired
            .iter()
            .map(|d| {
                let value = serde_json::json!({
                    "value": value_json(&d.value), "set_at": rfc3339(d.set_at),
                    "set_by": d.set_by, "command_id": d.command_id,
                });
                (self.name(d.property).to_owned(), value)
            })
            .collect();
        let delta: Vec<&str> = (0..self.plans.properties.len())
            .filter(|i| twin.delta & (1u128 << i) != 0)
            .map(|i| self.name(i))
            .collect();
        let commands: Vec<_> = twin
            .commands
            .iter()
            .map(|c| {
                serde_json::json!({
                    "command_id": c.command_id, "desired_version": c.desired_version,
                    "state": c.state, "issued_at": rfc3339(c.issued_at),
                    "expires_at": c.expires_at.map(rfc3339), "attempt": c.attempt,
                    "set_by": c.set_by,
                })
            })
            .collect();
        let object = json.as_object_mut().expect("a twin is a JSON object");
        object.insert("desired_version".into(), twin.desired_version.into());
        object.insert("desired".into(), desired.into());
        object.insert("delta".into(), delta.into());
        object.insert("commands".into(), commands.into());
    }
}

impl Codec {
    /// An alert event record's value (as [`encode_alert`] wrote it, framed as the alert
    /// topic is) as JSON: the alert schema's field names, enums as symbols, times as
    /// RFC 3339.
    ///
    /// # Errors
    /// `Error::Decode` when the bytes are not an alert event.
    pub fn alert_json(&self, value: &[u8]) -> Result<serde_json::Value> {
        let datum = match self.alerts_header() {
            Some(_) if value.len() >= 5 => &value[5..],
            _ => value,
        };
        let v = apache_avro::reader::datum::GenericDatumReader::builder(&self.alert_schema)
            .build()
            .and_then(|r| r.read_value(&mut &datum[..]))
            .map_err(|e| Error::Decode(format!("alert event: {e}")))?;
        Ok(avro_json(&v))
    }
}

/// A command event (an Avro datum of [`COMMAND_EVENT_SCHEMA`]) as JSON, enums as symbols
/// and times as RFC 3339.
///
/// # Errors
/// `Error::Decode` when the bytes are not a command event.
pub fn command_event_json(value: &[u8]) -> Result<serde_json::Value> {
    static SCHEMA: std::sync::LazyLock<apache_avro::Schema> = std::sync::LazyLock::new(|| {
        apache_avro::Schema::parse_str(COMMAND_EVENT_SCHEMA).expect("command_event.avsc parses")
    });
    let v = apache_avro::reader::datum::GenericDatumReader::builder(&SCHEMA)
        .build()
        .and_then(|r| r.read_value(&mut &value[..]))
        .map_err(|e| Error::Decode(format!("command event: {e}")))?;
    Ok(avro_json(&v))
}

/// An Avro value (of the alert or command event schema) as JSON: enums as symbols, times
/// as RFC 3339.
fn avro_json(v: &apache_avro::types::Value) -> serde_json::Value {
    use apache_avro::types::Value as AV;
    use serde_json::json;
    match v {
        AV::Null => serde_json::Value::Null,
        AV::Boolean(b) => json!(b),
        AV::Int(i) => json!(i),
        AV::Long(i) => json!(i),
        AV::Float(f) => json!(f),
        AV::Double(f) => json!(f),
        AV::String(s) | AV::Enum(_, s) => json!(s),
        AV::TimestampMillis(t) => json!(rfc3339(*t)),
        AV::Union(_, inner) => avro_json(inner),
        AV::Record(fields) => fields
            .iter()
            .map(|(k, v)| (k.clone(), avro_json(v)))
            .collect::<serde_json::Map<_, _>>()
            .into(),
        AV::Array(items) => items.iter().map(avro_json).collect(),
        other => json!(format!("{other:?}")),
    }
}

/// Appends an alert event as an Avro datum of [`ALERT_SCHEMA`].
pub fn encode_alert(event: &AlertEvent, asset_id: &str, rules: &RuleSet, buf: &mut Vec<u8>) {
    let rule = &rules.rules[event.rule];
    put_str(buf, &event.alert_id);
    put_str(buf, asset_id);
    put_str(buf, &rule.code);
    put_long(buf, severity_index(rule.severity) as i64);
    put_long(buf, event.state as i64);
    put_str(buf, &rule.property_name);
    put_str(buf, rule.op.symbol());
    put_double(buf, event.value);
    put_double(buf, rule.threshold);
    put_long(buf, event.event_time);
    put_long(buf, event.raised_at);
    put_long(buf, event.twin_version);
    put_opt_str(buf, event.acknowledged_by.as_deref());
    put_opt_str(buf, event.reason);
    match &event.forecast {
        None => put_long(buf, 0),
        Some(f) => {
            put_long(buf, 1);
            put_long(buf, f.breach_at);
            put_double(buf, f.time_to_breach as f64 / 1000.0);
            put_double(buf, f.slope_per_minute);
            put_double(buf, f.fit);
        }
    }
}

/// A `["null", "string"]` union.
fn put_opt_str(buf: &mut Vec<u8>, s: Option<&str>) {
    match s {
        None => put_long(buf, 0),
        Some(s) => {
            put_long(buf, 1);
            put_str(buf, s);
        }
    }
}

/// A `["null", "long"]` union.
fn put_opt_long(buf: &mut Vec<u8>, v: Option<i64>) {
    match v {
        None => put_long(buf, 0),
        Some(v) => {
            put_long(buf, 1);
            put_long(buf, v);
        }
    }
}

/// Reads a `["null", "long"]` union.
fn opt_long(c: &mut Cursor<'_>) -> avro::ReadResult<Option<i64>> {
    match c.long()? {
        0 => Ok(None),
        1 => Ok(Some(c.long()?)),
        b => Err(format!("union branch {b}")),
    }
}

/// Reads a `["null", "string"]` union.
fn opt_str(c: &mut Cursor<'_>) -> avro::ReadResult<Option<String>> {
    match c.long()? {
        0 => Ok(None),
        1 => Ok(Some(c.str()?.to_owned())),
        b => Err(format!("union branch {b}")),
    }
}

/// Appends the `width` lowest decimal digits of `v`, zero-padded.
fn push_digits(out: &mut String, v: u64, width: u32) {
    for i in (0..width).rev() {
        out.push(char::from(b'0' + (v / 10u64.pow(i) % 10) as u8));
    }
}

/// A time given as epoch milliseconds or RFC 3339 (`2026-12-03T10:00:00Z`), as epoch
/// milliseconds; `None` when it is neither.
pub fn parse_time(text: &str) -> Option<i64> {
    if let Ok(ms) = text.parse::<i64>() {
        return Some(ms);
    }
    humantime::parse_rfc3339_weak(text)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .and_then(|d| i64::try_from(d.as_millis()).ok())
}

/// Formats epoch milliseconds as RFC 3339 (UTC), for any `millis`: years outside
/// 0000..=9999 are written in ISO 8601's expanded form (`+10000-01-01T...`, `-0001-...`),
/// since a device may send any time at all and the message saying so must not fail.
pub fn rfc3339(millis: i64) -> String {
    let (secs, ms) = (millis.div_euclid(1000), millis.rem_euclid(1000));
    let (days, day_secs) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Days to a proleptic Gregorian date (H. Hinnant's civil_from_days), in i128 so that
    // no i64 overflows.
    let z = i128::from(days) + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + i128::from(month <= 2);
    // Digits pushed one by one: the API formats several times per twin, and `format!` was
    // most of a twin's JSON.
    let mut out = String::with_capacity(24);
    match year {
        0..=9999 => push_digits(&mut out, year as u64, 4),
        10_000.. => {
            out.push('+');
            out.push_str(&year.to_string());
        }
        _ => out.push_str(&format!("-{:04}", -year)),
    }
    out.push('-');
    push_digits(&mut out, month as u64, 2);
    out.push('-');
    push_digits(&mut out, day as u64, 2);
    out.push('T');
    push_digits(&mut out, (day_secs / 3600) as u64, 2);
    out.push(':');
    push_digits(&mut out, (day_secs / 60 % 60) as u64, 2);
    out.push(':');
    push_digits(&mut out, (day_secs % 60) as u64, 2);
    out.push('.');
    push_digits(&mut out, ms as u64, 3);
    out.push('Z');
    out
}

fn status_index(s: Status) -> usize {
    Status::ALL
        .iter()
        .position(|x| *x == s)
        .expect("ALL lists every status")
}

fn severity_index(s: Severity) -> usize {
    Severity::ALL
        .iter()
        .position(|x| *x == s)
        .expect("ALL lists every severity")
}

fn read_prop(c: &mut Cursor<'_>, ty: PropType) -> avro::ReadResult<Option<Value>> {
    if let Some(n) = ty.nullable {
        let branch = c.long()?;
        if branch == n.null_branch {
            return Ok(None);
        }
        if branch != n.value_branch {
            return Err(format!("invalid union branch {branch}"));
        }
    }
    Ok(Some(match ty.kind {
        PropKind::Double => Value::Double(c.double()?),
        PropKind::Float => Value::Double(f64::from(c.float()?)),
        PropKind::Int => Value::Long(i64::from(c.int()?)),
        PropKind::Long => Value::Long(c.long()?),
        PropKind::Bool => Value::Bool(c.bool()?),
        PropKind::Str => Value::Str(c.str()?.into()),
    }))
}

fn write_prop(buf: &mut Vec<u8>, ty: PropType, value: Option<&Value>) {
    match (ty.nullable, value) {
        (Some(n), None) => return put_long(buf, n.null_branch),
        (Some(n), Some(_)) => put_long(buf, n.value_branch),
        (None, _) => {}
    }
    match (ty.kind, value) {
        (PropKind::Double, Some(Value::Double(v))) => put_double(buf, *v),
        (PropKind::Float, Some(Value::Double(v))) => put_float(buf, *v as f32),
        (PropKind::Int | PropKind::Long, Some(Value::Long(v))) => put_long(buf, *v),
        (PropKind::Bool, Some(Value::Bool(v))) => put_bool(buf, *v),
        (PropKind::Str, Some(Value::Str(v))) => put_str(buf, v),
        // A required field without a value (only possible for readings built by hand):
        // write the type's zero so the datum stays valid.
        (PropKind::Double, _) => put_double(buf, 0.0),
        (PropKind::Float, _) => put_float(buf, 0.0),
        (PropKind::Int | PropKind::Long, _) => put_long(buf, 0),
        (PropKind::Bool, _) => put_bool(buf, false),
        (PropKind::Str, _) => put_str(buf, ""),
    }
}

fn json_time(v: &serde_json::Value) -> Result<i64, String> {
    match v {
        serde_json::Value::Number(n) => n
            .as_i64()
            .ok_or_else(|| format!("{n} is not whole epoch milliseconds")),
        serde_json::Value::String(s) => {
            let t = humantime::parse_rfc3339_weak(s).map_err(|e| format!("'{s}': {e}"))?;
            let d = t
                .duration_since(std::time::UNIX_EPOCH)
                .map_err(|_| format!("'{s}' is before 1970"))?;
            Ok(d.as_millis() as i64)
        }
        _ => Err("must be epoch milliseconds or an RFC 3339 string".into()),
    }
}

fn json_prop(v: &serde_json::Value, kind: PropKind) -> Result<Option<Value>, String> {
    use serde_json::Value as J;
    Ok(Some(match (kind, v) {
        (_, J::Null) => return Ok(None),
        (PropKind::Double | PropKind::Float, J::Number(n)) => {
            Value::Double(n.as_f64().ok_or("not a number")?)
        }
        (PropKind::Int, J::Number(n)) => {
            let v = n.as_i64().ok_or("not a whole number")?;
            i32::try_from(v).map_err(|_| format!("{v} does not fit an int"))?;
            Value::Long(v)
        }
        (PropKind::Long, J::Number(n)) => Value::Long(n.as_i64().ok_or("not a whole number")?),
        (PropKind::Bool, J::Bool(b)) => Value::Bool(*b),
        (PropKind::Str, J::String(s)) => Value::Str(s.as_str().into()),
        (kind, other) => return Err(format!("expected {kind:?}, found {other}")),
    }))
}

/// A property value as JSON.
pub(crate) fn value_json(v: &Value) -> serde_json::Value {
    match v {
        Value::Double(x) => serde_json::json!(x),
        Value::Long(x) => serde_json::json!(x),
        Value::Bool(x) => serde_json::json!(x),
        Value::Str(x) => serde_json::json!(x),
    }
}

#[cfg(test)]
mod tests;
