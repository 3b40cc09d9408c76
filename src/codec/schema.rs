//! Turns the model's Avro schemas into encode/decode plans, once, at build time.
//!
//! A plan is a flat list of field steps with pre-resolved union branches and property
//! indices, so the per-record path never looks at an `apache_avro::Schema`. Anything the
//! plans cannot express is a configuration error naming the schema and field.

use apache_avro::Schema;
use apache_avro::schema::{RecordField, RecordSchema};

use crate::error::{Error, Result};
use crate::twin::{MAX_PROPERTIES, PropKind, Severity, Status};

/// How a nullable value is written: the union branch of `null` and of the value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Nullable {
    pub null_branch: i64,
    pub value_branch: i64,
}

/// A property-shaped field: a primitive, maybe in a union with null.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PropType {
    pub kind: PropKind,
    pub nullable: Option<Nullable>,
}

/// Unit of an event-time field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeUnit {
    Millis,
    Micros,
}

/// One field of the telemetry record.
#[derive(Clone, Debug, PartialEq)]
pub enum ReadingField {
    AssetId,
    EventTime(TimeUnit),
    Property(usize, PropType),
}

/// One field of the twin record.
#[derive(Clone, Debug, PartialEq)]
pub enum TwinField {
    AssetId,
    Version,
    EventTime,
    LastSeen,
    UpdatedAt,
    /// `["null", timestamp-millis]`.
    StillSince,
    /// An array of `{code: string, since: timestamp-millis}`.
    PendingAlerts,
    /// Symbol index of ACTIVE, IDLE, OFFLINE.
    Status([i64; 3]),
    Property(usize, PropType),
    PropertyTimes,
    /// Symbol index of INFO, WARNING, CRITICAL in the alert's severity enum.
    ActiveAlerts([i64; 3]),
    /// One of the optional desired-state fields.
    Desired(super::desired::Field),
    /// The optional forecast windows.
    Forecasts,
}

/// The names and types of the model's properties, as the telemetry schema declares them.
#[derive(Clone, Debug, PartialEq)]
pub struct SchemaProperty {
    /// Field name.
    pub name: String,
    /// Field type.
    pub kind: PropKind,
}

/// Plans for a model's two schemas.
#[derive(Clone, Debug)]
pub struct Plans {
    pub properties: Vec<SchemaProperty>,
    pub reading: Vec<ReadingField>,
    pub twin: Vec<TwinField>,
    /// From this index on, every twin field has default null: a stored or changelog twin
    /// that ends there was written before they were added (see [`optional_tail`]). Input is
    /// not read this way: a plain telemetry datum cut short at a field boundary would pass.
    pub twin_tail: usize,
}

/// The index from which every field has default null, so that a datum written before they
/// were appended to the schema ends there and reads them as null, exactly as Avro schema
/// resolution would with the older schema as the writer's. Fields appended this way are how
/// a model gains a property without reprocessing (see `ARCHITECTURE.md`).
fn optional_tail(fields: &[RecordField]) -> usize {
    fields
        .iter()
        .rposition(|f| f.default != Some(serde_json::Value::Null))
        .map_or(0, |i| i + 1)
}

fn record<'a>(schema: &'a Schema, what: &str) -> Result<&'a RecordSchema> {
    match schema {
        Schema::Record(r) => Ok(r),
        other => Err(Error::Config(format!(
            "{what} schema must be a record, found {other:?}"
        ))),
    }
}

fn prim(schema: &Schema) -> Option<PropKind> {
    Some(match schema {
        Schema::Double => PropKind::Double,
        Schema::Float => PropKind::Float,
        Schema::Int => PropKind::Int,
        Schema::Long => PropKind::Long,
        Schema::Boolean => PropKind::Bool,
        Schema::String => PropKind::Str,
        _ => return None,
    })
}

fn prop_type(field: &RecordField, what: &str) -> Result<PropType> {
    let bad = || {
        Error::Config(format!(
            "{what} field '{}': a property must be double, float, int, long, boolean or string, \
             optionally in a union with null; found {:?}",
            field.name, field.schema
        ))
    };
    if let Some(kind) = prim(&field.schema) {
        return Ok(PropType {
            kind,
            nullable: None,
        });
    }
    let Schema::Union(u) = &field.schema else {
        return Err(bad());
    };
    match u.variants() {
        [Schema::Null, v] => Ok(PropType {
            kind: prim(v).ok_or_else(bad)?,
            nullable: Some(Nullable {
                null_branch: 0,
                value_branch: 1,
            }),
        }),
        [v, Schema::Null] => Ok(PropType {
            kind: prim(v).ok_or_else(bad)?,
            nullable: Some(Nullable {
                null_branch: 1,
                value_branch: 0,
            }),
        }),
        _ => Err(bad()),
    }
}

fn symbols(schema: &Schema, wanted: &[&str], what: &str) -> Result<Vec<i64>> {
    let Schema::Enum(e) = schema else {
        return Err(Error::Config(format!(
            "{what} must be an enum, found {schema:?}"
        )));
    };
    wanted
        .iter()
        .map(|w| {
            e.symbols
                .iter()
                .position(|s| s == w)
                .map(|i| i as i64)
                .ok_or_else(|| Error::Config(format!("{what} lacks the symbol {w}")))
        })
        .collect()
}

fn three(v: Vec<i64>) -> [i64; 3] {
    [v[0], v[1], v[2]]
}

fn expect(field: &RecordField, ok: bool, wanted: &str) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "twin schema field '{}' must be {wanted}, found {:?}",
            field.name, field.schema
        )))
    }
}

impl Plans {
    /// Derives the model's properties and both plans from the schemas' JSON text.
    ///
    /// # Errors
    /// `Error::Config` naming the schema and field when a schema cannot serve as a twin model,
    /// or when the twin schema does not mirror every telemetry property.
    pub fn build(telemetry_json: &str, twin_json: &str) -> Result<Plans> {
        let telemetry = Schema::parse_str(telemetry_json)
            .map_err(|e| Error::Config(format!("telemetry schema: {e}")))?;
        let twin =
            Schema::parse_str(twin_json).map_err(|e| Error::Config(format!("twin schema: {e}")))?;
        let telemetry = record(&telemetry, "telemetry")?;
        let twin = record(&twin, "twin")?;

        let mut properties = Vec::new();
        let mut reading = Vec::new();
        for field in &telemetry.fields {
            reading.push(match field.name.as_str() {
                "asset_id" => match field.schema {
                    Schema::String => ReadingField::AssetId,
                    _ => return Err(Error::Config("telemetry field 'asset_id' must be a string".into())),
                },
                "event_time" => match field.schema {
                    Schema::TimestampMillis | Schema::Long => ReadingField::EventTime(TimeUnit::Millis),
                    Schema::TimestampMicros => ReadingField::EventTime(TimeUnit::Micros),
                    _ => {
                        return Err(Error::Config(
                            "telemetry field 'event_time' must be a long with logicalType timestamp-millis or timestamp-micros".into(),
                        ));
                    }
                },
                _ => {
                    let ty = prop_type(field, "telemetry")?;
                    properties.push(SchemaProperty { name: field.name.clone(), kind: ty.kind });
                    ReadingField::Property(properties.len() - 1, ty)
                }
            });
        }
        for required in [
            ReadingField::AssetId,
            ReadingField::EventTime(TimeUnit::Millis),
        ] {
            let found = reading
                .iter()
                .any(|f| std::mem::discriminant(f) == std::mem::discriminant(&required));
            if !found {
                return Err(Error::Config(format!(
                    "telemetry schema '{}' lacks the required field {}",
                    telemetry.name,
                    if required == ReadingField::AssetId {
                        "asset_id (string)"
                    } else {
                        "event_time (timestamp-millis)"
                    }
                )));
            }
        }
        if properties.len() > MAX_PROPERTIES {
            return Err(Error::Config(format!(
                "telemetry schema has {} properties; at most {MAX_PROPERTIES} are supported",
                properties.len()
            )));
        }

        let mut twin_fields = Vec::new();
        for field in &twin.fields {
            let s = &field.schema;
            twin_fields.push(match field.name.as_str() {
                "asset_id" => {
                    expect(field, *s == Schema::String, "a string")?;
                    TwinField::AssetId
                }
                "version" => {
                    expect(field, *s == Schema::Long, "a long")?;
                    TwinField::Version
                }
                "event_time" | "last_seen" | "updated_at" => {
                    expect(field, *s == Schema::TimestampMillis, "a long with logicalType timestamp-millis")?;
                    match field.name.as_str() {
                        "event_time" => TwinField::EventTime,
                        "last_seen" => TwinField::LastSeen,
                        _ => TwinField::UpdatedAt,
                    }
                }
                "still_since" => {
                    let ok = matches!(s, Schema::Union(u)
                        if u.variants() == [Schema::Null, Schema::TimestampMillis]);
                    expect(field, ok, "[\"null\", timestamp-millis]")?;
                    TwinField::StillSince
                }
                "pending_alerts" => {
                    let ok = matches!(s, Schema::Array(a) if matches!(&*a.items, Schema::Record(r)
                        if r.fields.len() == 2
                            && r.fields[0].name == "code" && r.fields[0].schema == Schema::String
                            && r.fields[1].name == "since" && r.fields[1].schema == Schema::TimestampMillis));
                    expect(field, ok, "an array of records with fields code (string) and since (timestamp-millis)")?;
                    TwinField::PendingAlerts
                }
                "status" => {
                    let wanted: Vec<_> = Status::ALL.iter().map(|s| s.symbol()).collect();
                    TwinField::Status(three(symbols(s, &wanted, "twin field 'status'")?))
                }
                "property_times" => {
                    let ok = matches!(s, Schema::Map(m) if *m.types == Schema::TimestampMillis);
                    expect(field, ok, "a map of timestamp-millis")?;
                    TwinField::PropertyTimes
                }
                "active_alerts" => TwinField::ActiveAlerts(active_alerts_plan(field)?),
                super::forecast::FIELD => {
                    super::forecast::check(s).map_err(Error::Config)?;
                    TwinField::Forecasts
                }
                name if super::desired::DESIRED_FIELDS.contains(&name) => {
                    TwinField::Desired(super::desired::field(name, s).map_err(Error::Config)?)
                }
                name => {
                    let Some(index) = properties.iter().position(|p| p.name == name) else {
                        return Err(Error::Config(format!(
                            "twin schema field '{name}' is neither an envelope field nor a property of the telemetry schema"
                        )));
                    };
                    let ty = prop_type(field, "twin")?;
                    if ty.kind != properties[index].kind {
                        return Err(Error::Config(format!(
                            "twin schema field '{name}' is {:?} but the telemetry schema says {:?}",
                            ty.kind, properties[index].kind
                        )));
                    }
                    if ty.nullable.is_none() {
                        return Err(Error::Config(format!(
                            "twin schema field '{name}' must be a union with null (a twin has no value before the first reading)"
                        )));
                    }
                    TwinField::Property(index, ty)
                }
            });
        }
        for (index, p) in properties.iter().enumerate() {
            if !twin_fields
                .iter()
                .any(|f| matches!(f, TwinField::Property(i, _) if *i == index))
            {
                return Err(Error::Config(format!(
                    "twin schema '{}' lacks the telemetry property '{}'; add {{\"name\": \"{}\", \"type\": [\"null\", \"{}\"], \"default\": null}}",
                    twin.name,
                    p.name,
                    p.name,
                    p.kind.avro_name()
                )));
            }
        }
        for envelope in [
            "asset_id",
            "version",
            "event_time",
            "last_seen",
            "updated_at",
            "still_since",
            "status",
            "property_times",
            "active_alerts",
            "pending_alerts",
        ] {
            if !twin.fields.iter().any(|f| f.name == envelope) {
                return Err(Error::Config(format!(
                    "twin schema '{}' lacks the envelope field '{envelope}' (see schemas/vehicle_twin.avsc)",
                    twin.name
                )));
            }
        }
        Ok(Plans {
            properties,
            reading,
            twin: twin_fields,
            twin_tail: optional_tail(&twin.fields),
        })
    }
}

fn active_alerts_plan(field: &RecordField) -> Result<[i64; 3]> {
    let wanted = "an array of records with fields alert_id (string), code (string), severity (enum), \
                  value (double), threshold (double), raised_at (timestamp-millis), \
                  acknowledged_at ([null, timestamp-millis]), acknowledged_by ([null, string]), in that order";
    let Schema::Array(a) = &field.schema else {
        return Err(Error::Config(format!(
            "twin field 'active_alerts' must be {wanted}"
        )));
    };
    let Schema::Record(r) = &*a.items else {
        return Err(Error::Config(format!(
            "twin field 'active_alerts' must be {wanted}"
        )));
    };
    let shape: Vec<(&str, &Schema)> = r
        .fields
        .iter()
        .map(|f| (f.name.as_str(), &f.schema))
        .collect();
    let union = |s: &Schema, of: Schema| matches!(s, Schema::Union(u) if u.variants() == [Schema::Null, of]);
    let ok = shape.len() == 8
        && shape[0] == ("alert_id", &Schema::String)
        && shape[1] == ("code", &Schema::String)
        && shape[2].0 == "severity"
        && shape[3] == ("value", &Schema::Double)
        && shape[4] == ("threshold", &Schema::Double)
        && shape[5] == ("raised_at", &Schema::TimestampMillis)
        && shape[6].0 == "acknowledged_at"
        && union(shape[6].1, Schema::TimestampMillis)
        && shape[7].0 == "acknowledged_by"
        && union(shape[7].1, Schema::String);
    if !ok {
        return Err(Error::Config(format!(
            "twin field 'active_alerts' must be {wanted}"
        )));
    }
    let wanted: Vec<_> = Severity::ALL.iter().map(|s| s.symbol()).collect();
    Ok(three(symbols(
        shape[2].1,
        &wanted,
        "active alert field 'severity'",
    )?))
}
