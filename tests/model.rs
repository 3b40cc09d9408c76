//! The twin model is the schema: a property added to the schemas, and a rule on it, flows
//! into twins, the changelog and alerts with no code change; a non-vehicle model runs on the
//! same binary.

mod common;

use apache_avro::types::Value as AV;
use common::{TestPipeline, copy_dir, number, root, text};
use rdkafka::Message;
use twinflow::config::TopologyConfig;
use twinflow::embedded::EmbeddedKafka;
use twinflow::twin::Value;

fn start(topology: TopologyConfig) -> (EmbeddedKafka, TestPipeline) {
    let kafka = EmbeddedKafka::start(1).unwrap();
    let mut p = TestPipeline::new(&kafka.bootstrap_servers(), topology, &[]);
    for spec in p.topology.topics.all() {
        kafka.create_topic(&spec.name, spec.partitions).unwrap();
    }
    p.start();
    (kafka, p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_property_added_to_the_schemas_reaches_twin_changelog_and_alerts() {
    // A user's edit: pressure_bar in both schemas, and a rule on it. Nothing else.
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&root().join("schemas"), &dir.path().join("schemas"));
    copy_dir(&root().join("topology"), &dir.path().join("topology"));
    let field = r#"{"name": "pressure_bar", "type": ["null", "double"], "default": null, "doc": "Tyre pressure."},
    {"name": "battery_pct""#;
    for schema in ["vehicle_telemetry.avsc", "vehicle_twin.avsc"] {
        let path = dir.path().join("schemas").join(schema);
        let text =
            std::fs::read_to_string(&path)
                .unwrap()
                .replacen(r#"{"name": "battery_pct""#, field, 1);
        std::fs::write(&path, text).unwrap();
    }
    let model = dir.path().join("topology/vehicle.toml");
    let rule = "\n[[rules]]\ncode = \"TYRE_PRESSURE_LOW\"\nseverity = \"WARNING\"\nproperty = \"pressure_bar\"\nop = \"<\"\nthreshold = 6.5\n";
    std::fs::write(&model, std::fs::read_to_string(&model).unwrap() + rule).unwrap();

    let (_kafka, mut p) = start(TopologyConfig {
        topics: dir.path().join("topology/topics.toml"),
        model,
    });
    p.send(
        "truck-9",
        1_790_000_000_000,
        &[("pressure_bar", 8.1), ("speed_kmh", 70.0)],
    )
    .await;
    p.send("truck-9", 1_790_000_001_000, &[("pressure_bar", 6.2)])
        .await;

    let twins = p.changelog(2);
    let pressure = p.topology.model.property("pressure_bar").unwrap();
    assert_eq!(twins[1].value(pressure), Some(&Value::Double(6.2)));

    // An outside reader with only the edited twin schema sees the new field.
    let schema = apache_avro::Schema::parse_str(
        &std::fs::read_to_string(dir.path().join("schemas/vehicle_twin.avsc")).unwrap(),
    )
    .unwrap();
    let raw = p.read("twin-changelog", 2, std::time::Duration::from_secs(10));
    let AV::Record(fields) = common::avro_read(&schema, raw[1].payload().unwrap()) else {
        panic!("twin is a record")
    };
    let value = &fields.iter().find(|(n, _)| n == "pressure_bar").unwrap().1;
    assert_eq!(value, &AV::Union(1, Box::new(AV::Double(6.2))));

    let alerts = p.alerts(1);
    assert_eq!(text(&alerts[0]["code"]), "TYRE_PRESSURE_LOW");
    assert_eq!(text(&alerts[0]["property"]), "pressure_bar");
    assert_eq!(number(&alerts[0]["value"]), 6.2);
    assert_eq!(twins[1].alerts[0].code, "TYRE_PRESSURE_LOW");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pump_model_runs_on_the_same_binary() {
    let topology = TopologyConfig {
        topics: root().join("topology/topics.toml"),
        model: root().join("topology/pump.toml"),
    };
    let (_kafka, mut p) = start(topology);
    p.send(
        "pump-1",
        1_790_000_000_000,
        &[
            ("pressure_bar", 9.0),
            ("flow_lpm", 120.0),
            ("vibration_mm_s", 2.5),
        ],
    )
    .await;
    p.send(
        "pump-1",
        1_790_000_001_000,
        &[("pressure_bar", 13.5), ("vibration_mm_s", 7.5)],
    )
    .await;
    p.send("pump-1", 1_790_000_002_000, &[("flow_lpm", 0.0)])
        .await;
    p.send("pump-1", 1_790_000_031_000, &[("vibration_mm_s", 7.2)])
        .await;

    let twins = p.changelog(4);
    assert_eq!(
        twins[2].status,
        twinflow::twin::Status::Idle,
        "no flow: idle"
    );
    let pending: Vec<_> = twins[2]
        .pending
        .iter()
        .map(|a| (a.code.as_str(), a.since))
        .collect();
    assert_eq!(
        pending,
        [("VIBRATION_HIGH", 1_790_000_001_000)],
        "VIBRATION_HIGH waits out its 30 s"
    );
    let last = &twins[3];
    let codes: Vec<_> = last.alerts.iter().map(|a| a.code.as_str()).collect();
    assert_eq!(codes, ["OVERPRESSURE", "VIBRATION_HIGH"]);
    assert!(last.pending.is_empty());
    let alerts = p.alerts(2);
    assert!(alerts.iter().all(|a| text(&a["state"]) == "RAISED"));
    p.stop().await;
}
