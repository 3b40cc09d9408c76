//! The twin model is the schema: a property added to the schemas, and a rule on it, flows
//! into twins, the changelog and alerts with no code change; a non-vehicle model runs on the
//! same binary.

mod common;

use apache_avro::types::Value as AV;
use common::{TestPipeline, copy_dir, number, root, text};
use rdkafka::Message;
use twinflow::config::TopologyConfig;
use twinflow::demo::embedded::EmbeddedKafka;
use twinflow::twin::Value;

fn start(topology: TopologyConfig) -> (EmbeddedKafka, TestPipeline) {
    let (kafka, mut p) = common::on_embedded(topology);
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

/// Appends an optional `pressure_bar` to the fields of the schema at `path`.
fn append_pressure(path: &std::path::Path) {
    let mut schema: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    schema["fields"].as_array_mut().unwrap().push(serde_json::json!(
        {"name": "pressure_bar", "type": ["null", "double"], "default": null, "doc": "Tyre pressure."}
    ));
    std::fs::write(path, schema.to_string()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appending_an_optional_property_needs_no_reprocessing_and_keeps_old_readers_working() {
    // Version 1: the shipped model, copied so it can be edited.
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&root().join("schemas"), &dir.path().join("schemas"));
    copy_dir(&root().join("topology"), &dir.path().join("topology"));
    let v1_twin = dir.path().join("v1_twin.avsc");
    std::fs::copy(dir.path().join("schemas/vehicle_twin.avsc"), &v1_twin).unwrap();
    let topology = || TopologyConfig {
        topics: dir.path().join("topology/topics.toml"),
        model: dir.path().join("topology/vehicle.toml"),
    };
    let (kafka, mut v1) = start(topology());
    let t0 = v1.now() - 60_000;
    v1.send("van-1", t0, &[("speed_kmh", 50.0), ("temperature_c", 4.0)])
        .await;
    v1.send("van-2", t0, &[("speed_kmh", 20.0)]).await;
    v1.changelog(2);
    v1.stop().await;

    // Version 2: pressure_bar appended to both schemas; the same store, no reprocessing.
    append_pressure(&dir.path().join("schemas/vehicle_telemetry.avsc"));
    append_pressure(&dir.path().join("schemas/vehicle_twin.avsc"));
    let mut v2 = TestPipeline::new(&kafka.bootstrap_servers(), topology(), &[]);
    std::mem::swap(&mut v2.state, &mut v1.state);
    v2.group = v1.group.clone();
    v2.start();
    v2.send("van-1", t0 + 1000, &[("pressure_bar", 2.5)]).await;
    v2.send("van-2", t0 + 1000, &[("temperature_c", 5.0)]).await;
    let twins = v2.changelog(4);
    let model = v2.topology.model.clone();
    let prop =
        |t: &twinflow::twin::Twin, name: &str| t.value(model.property(name).unwrap()).cloned();
    let van1 = twins
        .iter()
        .find(|t| t.asset_id == "van-1" && t.version == 2)
        .unwrap();
    assert_eq!(prop(van1, "pressure_bar"), Some(Value::Double(2.5)));
    assert_eq!(
        prop(van1, "speed_kmh"),
        Some(Value::Double(50.0)),
        "the twin stored under version 1 was read, not rebuilt"
    );
    let van2 = twins
        .iter()
        .find(|t| t.asset_id == "van-2" && t.version == 2)
        .unwrap();
    assert_eq!(prop(van2, "temperature_c"), Some(Value::Double(5.0)));
    assert_eq!(prop(van2, "pressure_bar"), None);

    // A changelog consumer still on version 1 of the twin schema (Python, fastavro) reads
    // every record, before and after the change.
    let out = std::process::Command::new(common::venv().join("bin/python"))
        .arg(root().join("tests/python/read_outputs.py"))
        .args([
            "--bootstrap",
            &v2.bootstrap,
            "--changelog",
            "twin-changelog",
        ])
        .args(["--alerts", "twin-alerts", "--twin-schema"])
        .arg(&v1_twin)
        .arg("--alert-schema")
        .arg(root().join("schemas/alert_event.avsc"))
        .args([
            "--expect-changelog",
            "4",
            "--expect-alerts",
            "0",
            "--timeout",
            "30",
            "--older-schema",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["twins"]["van-1"]["version"], 2);
    assert_eq!(doc["twins"]["van-1"]["speed_kmh"], 50.0);
    assert_eq!(doc["twins"]["van-2"]["temperature_c"], 5.0);
    v2.stop().await;

    // An instance with an empty store restores from the mixed changelog.
    let mut fresh = TestPipeline::new(&kafka.bootstrap_servers(), topology(), &[]);
    fresh.group = v2.group.clone();
    fresh.start();
    fresh
        .send("van-1", t0 + 2000, &[("battery_pct", 90.0)])
        .await;
    let twins = fresh.changelog(5);
    let van1 = &twins
        .iter()
        .find(|t| t.asset_id == "van-1" && t.version == 3)
        .unwrap();
    assert_eq!(prop(van1, "pressure_bar"), Some(Value::Double(2.5)));
    assert_eq!(prop(van1, "speed_kmh"), Some(Value::Double(50.0)));
    fresh.stop().await;
}

/// The demo as a user runs it with the second shipped model: the simulator drives the pump
/// model (no vehicle in it), the fleet has pump twins, and the VIBRATION_HIGH rule, which
/// needs 30 s of vibration, raises within the run: the demo's backlog carries that much of
/// the fleet's past.
#[test]
fn the_demo_runs_the_pump_model() {
    let port = common::free_port();
    let mut demo = std::process::Command::new(env!("CARGO_BIN_EXE_twinflow"))
        .current_dir(root())
        .args(["demo", "--model", "topology/pump.toml", "--duration", "20s"])
        .args(["--http", &format!("127.0.0.1:{port}")])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let raised = |metrics: &str| {
        metrics.lines().any(|l| {
            l.starts_with("twinflow_alerts_emitted_total{")
                && l.contains("rule=\"VIBRATION_HIGH\"")
                && l.contains("state=\"RAISED\"")
                && l.rsplit(' ').next() != Some("0")
        })
    };
    let (mut twins, mut vibration) = (None, false);
    // Until the demo ends by itself, after its 20 s.
    while demo.try_wait().unwrap().is_none() && !(twins.is_some() && vibration) {
        if twins.is_none() {
            twins = common::http_get(port, "/twins?limit=3")
                .filter(|(status, body)| *status == 200 && body.contains("\"pump-"))
                .map(|(_, body)| body);
        }
        vibration =
            vibration || common::http_get(port, "/metrics").is_some_and(|(_, body)| raised(&body));
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let out = demo.wait_with_output().unwrap();
    let banner = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{banner}");
    let twins = twins.unwrap_or_else(|| panic!("no pump twins on /twins; output:\n{banner}"));
    let page: serde_json::Value = serde_json::from_str(&twins).unwrap();
    let first = &page["twins"][0];
    assert!(
        first["properties"]["flow_lpm"].is_number(),
        "a pump twin: {first}"
    );
    assert!(
        vibration,
        "no VIBRATION_HIGH alert raised; output:\n{banner}"
    );
    assert!(
        banner.contains(&format!("http://127.0.0.1:{port}/ ")),
        "{banner}"
    );
}
