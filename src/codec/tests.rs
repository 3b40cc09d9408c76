use super::*;
use crate::rules::{AlertState, Op, Rule};
use apache_avro::Schema;
use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::types::Value as AV;
use apache_avro::writer::datum::GenericDatumWriter;
use proptest::prelude::*;

const VEHICLE: &str = include_str!("../../schemas/vehicle_telemetry.avsc");
const VEHICLE_TWIN: &str = include_str!("../../schemas/vehicle_twin.avsc");
const PUMP: &str = include_str!("../../schemas/pump_telemetry.avsc");
const PUMP_TWIN: &str = include_str!("../../schemas/pump_twin.avsc");

fn avro_read(schema: &Schema, bytes: &[u8]) -> AV {
    GenericDatumReader::builder(schema)
        .build()
        .unwrap()
        .read_value(&mut &bytes[..])
        .unwrap()
}

fn avro_write(schema: &Schema, value: AV) -> Vec<u8> {
    GenericDatumWriter::builder(schema)
        .build()
        .unwrap()
        .write_value_to_vec(value)
        .unwrap()
}

fn field<'a>(record: &'a AV, name: &str) -> &'a AV {
    let AV::Record(fields) = record else {
        panic!("not a record: {record:?}")
    };
    &fields
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no field {name}"))
        .1
}

fn opt(v: Option<f64>) -> AV {
    match v {
        Some(x) => AV::Union(1, Box::new(AV::Double(x))),
        None => AV::Union(0, Box::new(AV::Null)),
    }
}

proptest! {
    /// A telemetry datum written by the reference implementation decodes to the same reading.
    #[test]
    fn decodes_what_apache_avro_writes(
        id in "[a-z0-9-]{1,20}",
        t in 0i64..4_000_000_000_000,
        values in prop::collection::vec(prop::option::of(-1e6f64..1e6), 5),
    ) {
        let schema = Schema::parse_str(VEHICLE).unwrap();
        let names = ["lat", "lng", "speed_kmh", "temperature_c", "battery_pct"];
        let mut fields = vec![
            ("asset_id".to_string(), AV::String(id.clone())),
            ("event_time".to_string(), AV::TimestampMillis(t)),
        ];
        for (n, v) in names.iter().zip(&values) {
            fields.push((n.to_string(), opt(*v)));
        }
        let bytes = avro_write(&schema, AV::Record(fields));

        let codec = Codec::new(VEHICLE, VEHICLE_TWIN).unwrap();
        let mut reading = Reading::default();
        codec.decode_reading(Format::Avro, &bytes, &mut reading).unwrap();
        prop_assert_eq!(&reading.asset_id, &id);
        prop_assert_eq!(reading.event_time, t);
        let expected: Vec<_> = values.iter().enumerate()
            .filter_map(|(i, v)| v.map(|x| (i, Value::Double(x)))).collect();
        prop_assert_eq!(&reading.values, &expected);

        // And our encoder writes the same bytes back.
        let mut again = Vec::new();
        codec.encode_reading(&reading, &mut again);
        prop_assert_eq!(again, bytes);
    }

    /// Garbage never panics: it is a decode error.
    #[test]
    fn garbage_is_a_decode_error(bytes in prop::collection::vec(any::<u8>(), 0..80)) {
        let codec = Codec::new(VEHICLE, VEHICLE_TWIN).unwrap();
        let mut reading = Reading::default();
        for format in [Format::Avro, Format::Json] {
            if let Err(e) = codec.decode_reading(format, &bytes, &mut reading) {
                prop_assert!(matches!(e, Error::Decode(_)));
            }
        }
        let _ = codec.decode_twin(&bytes);
    }

    /// Twins round-trip through our codec, and the reference implementation reads them.
    #[test]
    fn twin_round_trips_and_reads_in_apache_avro(
        version in 1i64..1_000_000,
        t in 0i64..4_000_000_000_000,
        pressure in prop::option::of(0f64..50.0),
        vibration in prop::option::of(0f32..20.0),
        running in prop::option::of(any::<bool>()),
        firmware in prop::option::of("[a-z0-9.]{0,8}"),
        alerts in 0usize..3,
    ) {
        let codec = Codec::new(PUMP, PUMP_TWIN).unwrap();
        let mut props = vec![None; 5];
        props[0] = pressure.map(|v| Prop { value: Value::Double(v), time: t });
        props[2] = vibration.map(|v| Prop { value: Value::Double(f64::from(v)), time: t - 5 });
        props[3] = running.map(|v| Prop { value: Value::Bool(v), time: t - 7 });
        props[4] = firmware.clone().map(|v| Prop { value: Value::Str(v.into()), time: 1 });
        let twin = Twin {
            asset_id: "pump-3".into(),
            version,
            event_time: t,
            last_seen: t + 10,
            updated_at: t + 20,
            still_since: running.map(|_| t + 5),
            status: Status::Idle,
            props,
            alerts: (0..alerts).map(|i| ActiveAlert {
                alert_id: format!("{i:032x}"),
                code: format!("R{i}"),
                severity: Severity::ALL[i],
                value: i as f64,
                threshold: 1.5,
                raised_at: t - i as i64,
                acknowledged_at: (i % 2 == 1).then_some(t + 30),
                acknowledged_by: (i % 2 == 1).then(|| format!("ops-{i}")),
            }).collect(),
            pending: (0..alerts).map(|i| PendingAlert { code: format!("P{i}"), since: t - 3 }).collect(),
        };
        let mut bytes = Vec::new();
        codec.encode_twin(&twin, &mut bytes);
        prop_assert_eq!(&codec.decode_twin(&bytes).unwrap(), &twin);

        let schema = Schema::parse_str(PUMP_TWIN).unwrap();
        let v = avro_read(&schema, &bytes);
        prop_assert_eq!(field(&v, "version"), &AV::Long(version));
        prop_assert_eq!(field(&v, "status"), &AV::Enum(1, "IDLE".into()));
        prop_assert_eq!(field(&v, "running"), &match running {
            Some(b) => AV::Union(1, Box::new(AV::Boolean(b))),
            None => AV::Union(0, Box::new(AV::Null)),
        });
        let AV::Array(items) = field(&v, "active_alerts") else { panic!() };
        prop_assert_eq!(items.len(), alerts);
        let AV::Map(times) = field(&v, "property_times") else { panic!() };
        prop_assert_eq!(times.get("pressure_bar").cloned(), pressure.map(|_| AV::TimestampMillis(t)));
    }
}

#[test]
fn alert_events_read_in_apache_avro() {
    let rules = RuleSet {
        rules: vec![Rule::threshold(
            "TEMP_BREACH",
            Severity::Critical,
            (3, "temperature_c"),
            Op::Gt,
            8.0,
        )],
    };
    let event = AlertEvent {
        rule: 0,
        state: AlertState::Cleared,
        alert_id: "abc".into(),
        value: 7.5,
        event_time: 2000,
        raised_at: 1000,
        twin_version: 42,
        acknowledged_by: None,
    };
    let mut bytes = Vec::new();
    encode_alert(&event, "reefer-1", &rules, &mut bytes);
    let schema = Schema::parse_str(ALERT_SCHEMA).unwrap();
    let v = avro_read(&schema, &bytes);
    assert_eq!(field(&v, "asset_id"), &AV::String("reefer-1".into()));
    assert_eq!(field(&v, "severity"), &AV::Enum(2, "CRITICAL".into()));
    assert_eq!(field(&v, "state"), &AV::Enum(1, "CLEARED".into()));
    assert_eq!(field(&v, "operator"), &AV::String(">".into()));
    assert_eq!(field(&v, "threshold"), &AV::Double(8.0));
    assert_eq!(field(&v, "raised_at"), &AV::TimestampMillis(1000));
    assert_eq!(field(&v, "twin_version"), &AV::Long(42));
    assert_eq!(
        field(&v, "acknowledged_by"),
        &AV::Union(0, Box::new(AV::Null))
    );
    let ack = AlertEvent {
        state: AlertState::Acknowledged,
        acknowledged_by: Some("ops@depot".into()),
        ..event
    };
    let mut bytes = Vec::new();
    encode_alert(&ack, "reefer-1", &rules, &mut bytes);
    let v = avro_read(&schema, &bytes);
    assert_eq!(field(&v, "state"), &AV::Enum(2, "ACKNOWLEDGED".into()));
    assert_eq!(
        field(&v, "acknowledged_by"),
        &AV::Union(1, Box::new(AV::String("ops@depot".into())))
    );
}

#[test]
fn json_readings_use_the_schema_field_names() {
    let codec = Codec::new(VEHICLE, VEHICLE_TWIN).unwrap();
    let mut r = Reading::default();
    let json = br#"{"asset_id":"van-2","event_time":"2026-01-02T03:04:05.250Z","speed_kmh":42,"lat":null,"extra":1}"#;
    codec.decode_reading(Format::Json, json, &mut r).unwrap();
    assert_eq!(r.asset_id, "van-2");
    assert_eq!(r.event_time, 1_767_323_045_250);
    assert_eq!(r.values, vec![(2, Value::Double(42.0))]);
    let bad = br#"{"asset_id":"van-2","event_time":1,"speed_kmh":"fast"}"#;
    let err = codec.decode_reading(Format::Json, bad, &mut r).unwrap_err();
    assert!(err.to_string().contains("speed_kmh"), "{err}");
}

#[test]
fn trailing_bytes_mean_another_schema() {
    let codec = Codec::new(VEHICLE, VEHICLE_TWIN).unwrap();
    let mut bytes = Vec::new();
    codec.encode_reading(
        &Reading {
            asset_id: "a".into(),
            event_time: 1,
            values: vec![],
        },
        &mut bytes,
    );
    bytes.push(0);
    let err = codec
        .decode_reading(Format::Avro, &bytes, &mut Reading::default())
        .unwrap_err();
    assert!(err.to_string().contains("1 bytes left"), "{err}");
}

#[test]
fn twin_schema_must_mirror_every_telemetry_property() {
    let twin_without_battery = VEHICLE_TWIN.replace("\"battery_pct\"", "\"battery_level\"");
    let err = Codec::new(VEHICLE, &twin_without_battery)
        .unwrap_err()
        .to_string();
    assert!(err.contains("battery_level"), "{err}");
    let telemetry_with_pressure = VEHICLE.replace(
        "{\"name\": \"battery_pct\"",
        "{\"name\": \"pressure_bar\", \"type\": [\"null\", \"double\"], \"default\": null},\n    {\"name\": \"battery_pct\"",
    );
    let err = Codec::new(&telemetry_with_pressure, VEHICLE_TWIN)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("lacks the telemetry property 'pressure_bar'"),
        "{err}"
    );
}
