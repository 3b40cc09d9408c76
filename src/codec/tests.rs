use super::*;
use crate::rules::{AlertState, Op, Rule};
use crate::twin::{Command, CommandState, DesiredValue};
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
        desired in 0usize..4,
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
            desired_version: if desired > 0 { version } else { 0 },
            desired: (0..desired).map(|i| DesiredValue {
                property: [0, 3, 4][i],
                value: [Value::Double(1.5), Value::Bool(true), Value::Str("v2".into())][i].clone(),
                set_at: t - i as i64,
                set_by: format!("ops-{i}"),
                command_id: format!("c{i}"),
            }).collect(),
            delta: (0..desired).filter(|i| i % 2 == 0).map(|i| 1u128 << [0, 3, 4][i]).sum(),
            commands: (0..desired).map(|i| Command {
                command_id: format!("c{i}"),
                desired_version: version - i as i64,
                state: CommandState::ALL[i],
                issued_at: t - i as i64,
                expires_at: (i % 2 == 0).then_some(t + 1000),
                attempt: 1 + i as i64,
                set_by: format!("ops-{i}"),
            }).collect(),
            forecasts: (0..alerts).map(|i| crate::twin::ForecastWindow {
                code: format!("F{i}"),
                points: (0..i).map(|j| (t - 60_000 * j as i64, j as f64 * 0.5 - 3.0)).collect(),
            }).collect(),
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
        match field(&v, "desired") {
            AV::Union(1, items) => {
                let AV::Array(items) = &**items else { panic!() };
                prop_assert_eq!(items.len(), desired);
            }
            other => prop_assert_eq!((desired, other), (0, &AV::Union(0, Box::new(AV::Null)))),
        }
        match field(&v, "delta") {
            AV::Union(1, items) => {
                let AV::Array(items) = &**items else { panic!() };
                prop_assert_eq!(&items[0], &AV::String("pressure_bar".into()));
            }
            other => prop_assert_eq!((desired, other), (0, &AV::Union(0, Box::new(AV::Null)))),
        }
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
        reason: None,
        forecast: None,
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
    assert_eq!(field(&v, "reason"), &AV::Union(0, Box::new(AV::Null)));
    let deleted = AlertEvent {
        reason: Some("deleted"),
        ..ack
    };
    let mut bytes = Vec::new();
    encode_alert(&deleted, "reefer-1", &rules, &mut bytes);
    let v = avro_read(&schema, &bytes);
    assert_eq!(
        field(&v, "reason"),
        &AV::Union(1, Box::new(AV::String("deleted".into())))
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

/// `schema` (JSON) with `field` (JSON) appended to its fields.
fn appended(schema: &str, field: &str) -> String {
    let mut s: serde_json::Value = serde_json::from_str(schema).unwrap();
    s["fields"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::from_str(field).unwrap());
    s.to_string()
}

/// `schema` (JSON) without the field `name`.
fn without(schema: &str, name: &str) -> String {
    let mut s: serde_json::Value = serde_json::from_str(schema).unwrap();
    s["fields"]
        .as_array_mut()
        .unwrap()
        .retain(|f| f["name"] != name);
    s.to_string()
}

const PRESSURE: &str = r#"{"name": "pressure_bar", "type": ["null", "double"], "default": null}"#;

fn framed(id: u32, datum: &[u8]) -> Vec<u8> {
    let mut v = confluent::header(id).to_vec();
    v.extend_from_slice(datum);
    v
}

#[test]
fn confluent_frames_are_split_or_refused() {
    assert_eq!(confluent::header(258), [0, 0, 0, 1, 2]);
    assert_eq!(
        confluent::split(&[0, 0, 0, 1, 2, 9]).unwrap(),
        (258, &[9u8][..])
    );
    for bad in [&[][..], &[1, 0, 0, 0, 1, 2][..], &[0, 0, 1][..]] {
        let err = confluent::split(bad).unwrap_err();
        assert!(matches!(err, Error::Decode(_)), "{err}");
    }
}

#[test]
fn confluent_readings_resolve_compatible_writer_schemas() {
    let codec = Codec::new(VEHICLE, VEHICLE_TWIN).unwrap();
    let (own_telemetry, own_twin) = codec.schemas();
    let newer = Schema::parse_str(&appended(VEHICLE, PRESSURE)).unwrap();
    let older = Schema::parse_str(&without(VEHICLE, "battery_pct")).unwrap();
    let incompatible = Schema::parse_str(&VEHICLE.replace(
        r#"{"name": "speed_kmh", "type": ["null", "double"]"#,
        r#"{"name": "speed_kmh", "type": ["null", "string"]"#,
    ))
    .unwrap();
    let writers = codec.writers();
    for (id, schema) in [(1, VEHICLE.to_owned()), (2, newer.canonical_form())] {
        writers.insert(id, confluent::Writer::new(&schema, own_telemetry, own_twin));
    }
    // Defaults matter for resolution: register the older schema's full text.
    writers.insert(
        3,
        confluent::Writer::new(&without(VEHICLE, "battery_pct"), own_telemetry, own_twin),
    );
    writers.insert(
        4,
        confluent::Writer::new(&incompatible.canonical_form(), own_telemetry, own_twin),
    );
    writers.insert(5, confluent::Writer::unknown(5));
    let base = || {
        vec![
            ("asset_id".to_string(), AV::String("van-1".into())),
            ("event_time".to_string(), AV::TimestampMillis(1000)),
            ("lat".to_string(), opt(Some(52.5))),
            ("lng".to_string(), opt(None)),
            ("speed_kmh".to_string(), opt(Some(30.0))),
            ("temperature_c".to_string(), opt(None)),
        ]
    };
    let mut with_battery = base();
    with_battery.push(("battery_pct".into(), opt(Some(80.0))));
    let mut newer_fields = with_battery.clone();
    newer_fields.push(("pressure_bar".into(), opt(Some(2.5))));
    let own = Schema::parse_str(VEHICLE).unwrap();
    let mut r = Reading::default();
    for (id, bytes, battery) in [
        (1, avro_write(&own, AV::Record(with_battery)), Some(80.0)),
        (2, avro_write(&newer, AV::Record(newer_fields)), Some(80.0)),
        (3, avro_write(&older, AV::Record(base())), None),
    ] {
        codec
            .decode_reading(Format::ConfluentAvro, &framed(id, &bytes), &mut r)
            .unwrap_or_else(|e| panic!("schema {id}: {e}"));
        assert_eq!(r.asset_id, "van-1");
        assert_eq!(r.event_time, 1000);
        let mut expected = vec![(0, Value::Double(52.5)), (2, Value::Double(30.0))];
        expected.extend(battery.map(|b| (4, Value::Double(b))));
        assert_eq!(r.values, expected, "schema {id}");
    }
    let err = codec
        .decode_reading(Format::ConfluentAvro, &framed(4, &[2, b'x']), &mut r)
        .unwrap_err();
    assert!(
        matches!(err, Error::Decode(_)) && err.to_string().contains("schema id 4"),
        "{err}"
    );
    let err = codec
        .decode_reading(Format::ConfluentAvro, &framed(5, &[2, b'x']), &mut r)
        .unwrap_err();
    assert!(
        err.to_string().contains("not in the schema registry"),
        "{err}"
    );
    let err = codec
        .decode_reading(Format::ConfluentAvro, &framed(6, &[2, b'x']), &mut r)
        .unwrap_err();
    assert!(matches!(err, Error::SchemaNeeded(6)), "{err}");
}

#[test]
fn a_model_with_appended_optional_properties_reads_older_data() {
    let old = Codec::new(VEHICLE, VEHICLE_TWIN).unwrap();
    let new = Codec::new(
        &appended(VEHICLE, PRESSURE),
        &appended(VEHICLE_TWIN, PRESSURE),
    )
    .unwrap();
    let reading = Reading {
        asset_id: "van-9".into(),
        event_time: 5,
        values: vec![(2, Value::Double(12.0))],
    };
    // Plain telemetry is read strictly: a datum of the older schema is indistinguishable
    // from one cut short, so it is refused (Confluent-framed input resolves it instead).
    let mut bytes = Vec::new();
    old.encode_reading(&reading, &mut bytes);
    let mut r = Reading::default();
    assert!(new.decode_reading(Format::Avro, &bytes, &mut r).is_err());

    let mut twin = Twin {
        asset_id: "van-9".into(),
        version: 3,
        event_time: 5,
        last_seen: 6,
        updated_at: 7,
        still_since: None,
        status: Status::Active,
        props: vec![None; 5],
        alerts: Vec::new(),
        pending: Vec::new(),
        ..Twin::blank(String::new(), 0)
    };
    twin.props[2] = Some(Prop {
        value: Value::Double(12.0),
        time: 5,
    });
    let mut stored = Vec::new();
    old.encode_twin(&twin, &mut stored);
    let read = new.decode_twin(&stored).unwrap();
    assert_eq!(read.props.len(), 6);
    assert_eq!(read.props[2], twin.props[2]);
    assert_eq!(read.props[5], None);

    // And a reader still on the old schema reads the new twins: the appended field comes
    // after everything it knows.
    let mut newer = Vec::new();
    new.encode_twin(&read, &mut newer);
    let av = avro_read(&Schema::parse_str(VEHICLE_TWIN).unwrap(), &newer);
    assert_eq!(field(&av, "version"), &AV::Long(3));
    // A datum cut short before its optional tail is still an error (the last five bytes
    // are the null desired-state and forecasts fields, an optional tail themselves).
    assert_eq!(&stored[stored.len() - 5..], &[0, 0, 0, 0, 0]);
    assert!(new.decode_twin(&stored[..stored.len() - 6]).is_err());
}

#[test]
fn confluent_changelog_values_are_stored_plain() {
    let codec = Codec::new(VEHICLE, VEHICLE_TWIN).unwrap();
    codec.set_output_ids(Some(11), None);
    assert_eq!(codec.changelog_header(), Some([0, 0, 0, 0, 11]));
    assert_eq!(codec.alerts_header(), None);
    let twin = Twin {
        asset_id: "van-2".into(),
        version: 1,
        event_time: 5,
        last_seen: 6,
        updated_at: 7,
        still_since: None,
        status: Status::Offline,
        props: vec![None; 5],
        alerts: Vec::new(),
        pending: Vec::new(),
        ..Twin::blank(String::new(), 0)
    };
    let mut plain = Vec::new();
    codec.encode_twin(&twin, &mut plain);
    let value = framed(11, &plain);
    let stored = codec.stored_twin(&value).unwrap();
    assert_eq!(&*stored, &plain[..]);
    // A changelog record of an older twin schema is resolved into the current one.
    let (t, w) = codec.schemas();
    let older_twin = without(VEHICLE_TWIN, "pending_alerts");
    let older = Schema::parse_str(&older_twin).unwrap();
    codec
        .writers()
        .insert(12, confluent::Writer::new(&older_twin, t, w));
    let av = avro_read(&Schema::parse_str(VEHICLE_TWIN).unwrap(), &plain);
    let AV::Record(mut fields) = av else { panic!() };
    fields.retain(|(n, _)| n != "pending_alerts");
    let older_bytes = avro_write(&older, AV::Record(fields));
    let value = framed(12, &older_bytes);
    let stored = codec.stored_twin(&value).unwrap();
    assert_eq!(codec.decode_twin(&stored).unwrap(), twin);
    assert!(matches!(
        codec.stored_twin(&framed(13, &older_bytes)),
        Err(Error::SchemaNeeded(13))
    ));
}

proptest! {
    /// Within RFC 3339's years the format is humantime's; outside them it is ISO 8601's
    /// expanded form, and no time at all makes it fail.
    #[test]
    fn rfc3339_agrees_with_humantime_and_takes_any_time(millis in any::<i64>(), near in 0i64..253_402_300_800_000) {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(near as u64);
        prop_assert_eq!(rfc3339(near), humantime::format_rfc3339_millis(t).to_string());
        let text = rfc3339(millis);
        prop_assert!(text.ends_with('Z'), "{}", text);
    }
}

#[test]
fn rfc3339_writes_years_past_9999_and_before_0() {
    assert_eq!(rfc3339(253_402_300_800_000), "+10000-01-01T00:00:00.000Z");
    assert_eq!(rfc3339(-62_167_219_200_001), "-0001-12-31T23:59:59.999Z");
    assert_eq!(rfc3339(-1), "1969-12-31T23:59:59.999Z");
    assert_eq!(rfc3339(i64::MAX), "+292278994-08-17T07:12:55.807Z");
    assert_eq!(rfc3339(i64::MIN), "-292275055-05-16T16:47:04.192Z");
}
