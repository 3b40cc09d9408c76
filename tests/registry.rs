//! Schema Registry interop: twinflow reads what confluent-kafka's own `AvroSerializer`
//! writes (including compatible writer schemas that differ from the model's), and its
//! Confluent-framed changelog and alerts are read by confluent-kafka's `AvroDeserializer`.
//! The registry is `tests/python/registry.py`, a stand-in speaking the documented REST
//! subset, with basic auth on; the broker is the embedded mock cluster.

mod common;

use std::io::{BufRead, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{TestPipeline, header, root, venv};
use rdkafka::Message;
use twinflow::config::{RegistryConfig, Secret, TopologyConfig};
use twinflow::demo::embedded::EmbeddedKafka;

const USER: &str = "twinflow";
const PASSWORD: &str = "registry-s3cret";

/// The registry stand-in, stopped on drop.
struct Registry {
    child: Child,
    url: String,
}

impl Registry {
    fn start() -> Registry {
        let mut child = Command::new(venv().join("bin/python"))
            .arg(root().join("tests/python/registry.py"))
            .args(["--port", "0", "--user", &format!("{USER}:{PASSWORD}")])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("the registry stand-in starts (run `bash .ci/setup`)");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line
            .trim()
            .strip_prefix("listening ")
            .unwrap_or_else(|| panic!("registry said {line:?}"))
            .to_owned();
        Registry { child, url }
    }

    fn config(&self) -> RegistryConfig {
        RegistryConfig {
            url: self.url.clone(),
            username: Some(USER.into()),
            password: Some(Secret(PASSWORD.into())),
            ca_location: None,
            certificate_location: None,
            key_location: None,
            timeout: Duration::from_secs(5),
            auto_register: true,
        }
    }

    /// GET `path` with the credentials, as JSON.
    async fn get(&self, path: &str) -> serde_json::Value {
        reqwest::Client::new()
            .get(format!("{}{path}", self.url))
            .basic_auth(USER, Some(PASSWORD))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// topics.toml with the telemetry, changelog and alert topics in the Confluent format.
fn confluent_topology(dir: &Path) -> TopologyConfig {
    let text = std::fs::read_to_string(root().join("topology/topics.toml")).unwrap();
    let text = text
        .replace("format = \"avro\"", "format = \"confluent_avro\"")
        .replace(
            "name = \"twin-changelog\"",
            "name = \"twin-changelog\"\nformat = \"confluent_avro\"",
        )
        .replace(
            "name = \"twin-alerts\"",
            "name = \"twin-alerts\"\nformat = \"confluent_avro\"",
        );
    let topics = dir.join("topics.toml");
    std::fs::write(&topics, text).unwrap();
    TopologyConfig {
        topics,
        model: root().join("topology/vehicle.toml"),
    }
}

/// The vehicle telemetry schema with `edit` applied to its field list, written to `dir`.
fn telemetry_schema(
    dir: &Path,
    name: &str,
    edit: impl FnOnce(&mut Vec<serde_json::Value>),
) -> PathBuf {
    let text = std::fs::read_to_string(root().join("schemas/vehicle_telemetry.avsc")).unwrap();
    let mut schema: serde_json::Value = serde_json::from_str(&text).unwrap();
    edit(schema["fields"].as_array_mut().unwrap());
    let path = dir.join(name);
    std::fs::write(&path, schema.to_string()).unwrap();
    path
}

/// Runs tests/python/confluent_io.py and returns what it printed, as JSON.
fn confluent_io(args: &[&str], registry: &Registry, bootstrap: &str) -> serde_json::Value {
    let out = Command::new(venv().join("bin/python"))
        .arg(root().join("tests/python/confluent_io.py"))
        .args(args)
        .args(["--bootstrap", bootstrap, "--registry", &registry.url])
        .args(["--registry-user", &format!("{USER}:{PASSWORD}")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "confluent_io.py {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Produces `readings` (JSON objects) to the telemetry topic with AvroSerializer and `schema`.
fn produce(
    dir: &Path,
    registry: &Registry,
    bootstrap: &str,
    schema: &Path,
    readings: &[serde_json::Value],
) -> u64 {
    let input = dir.join("input.jsonl");
    let mut f = std::fs::File::create(&input).unwrap();
    for r in readings {
        writeln!(f, "{r}").unwrap();
    }
    let out = confluent_io(
        &[
            "produce",
            "--topic",
            "telemetry",
            "--schema",
            schema.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
        ],
        registry,
        bootstrap,
    );
    assert_eq!(out["produced"], readings.len() as u64);
    out["schema_id"].as_u64().unwrap()
}

/// Reads `n` records of `topic` with AvroDeserializer.
fn consume(registry: &Registry, bootstrap: &str, topic: &str, n: usize) -> Vec<serde_json::Value> {
    let out = confluent_io(
        &["consume", "--topic", topic, "--expect", &n.to_string()],
        registry,
        bootstrap,
    );
    out["records"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_what_the_confluent_serializer_writes_and_writes_what_it_reads() {
    let dir = tempfile::tempdir().unwrap();
    let kafka = EmbeddedKafka::start(1).unwrap();
    let bootstrap = kafka.bootstrap_servers();
    let registry = Registry::start();
    let mut p = TestPipeline::new(&bootstrap, confluent_topology(dir.path()), &[]);
    for spec in p.topology.topics.all() {
        kafka.create_topic(&spec.name, spec.partitions).unwrap();
    }
    p.registry = Some(registry.config());
    p.start();
    let t0 = p.now() - 60_000;

    // Devices on three versions of the telemetry schema: the model's own, a newer one with
    // an added optional field, an older one without battery_pct.
    let own = root().join("schemas/vehicle_telemetry.avsc");
    let newer = telemetry_schema(dir.path(), "newer.avsc", |f| {
        f.push(serde_json::json!({"name": "pressure_bar", "type": ["null", "double"], "default": null}))
    });
    let older = telemetry_schema(dir.path(), "older.avsc", |f| {
        f.retain(|f| f["name"] != "battery_pct")
    });
    let reading = |asset: &str, t: i64, extra: serde_json::Value| {
        let mut r = serde_json::json!({
            "asset_id": asset, "event_time": t, "lat": 52.0, "lng": 4.0,
            "speed_kmh": 50.0, "temperature_c": 4.0,
        });
        r.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        r
    };
    let own_id = produce(
        dir.path(),
        &registry,
        &bootstrap,
        &own,
        &[reading(
            "van-1",
            t0,
            serde_json::json!({"battery_pct": 80.0}),
        )],
    );
    let newer_id = produce(
        dir.path(),
        &registry,
        &bootstrap,
        &newer,
        &[reading(
            "van-1",
            t0 + 1000,
            serde_json::json!({"battery_pct": 70.0, "pressure_bar": 2.5, "temperature_c": 9.0}),
        )],
    );
    let older_id = produce(
        dir.path(),
        &registry,
        &bootstrap,
        &older,
        &[reading("van-2", t0 + 2000, serde_json::json!({}))],
    );
    assert_eq!(
        [own_id, newer_id, older_id]
            .iter()
            .collect::<std::collections::HashSet<_>>()
            .len(),
        3,
        "three schemas, three ids"
    );
    // A registry id nobody registered, and a value without the Confluent header.
    p.send_raw(Some(b"van-3"), Some(&[0, 0, 0, 0x27, 0x0f, 2, b'x']))
        .await;
    p.send_raw(Some(b"van-3"), Some(&p.encode("van-3", t0, &[])))
        .await;
    p.wait_consumed(5).await;

    // Changelog and alerts, read as a Confluent consumer would.
    let twins = consume(&registry, &bootstrap, "twin-changelog", 3);
    let last = |asset: &str| {
        twins
            .iter()
            .filter(|r| r["key"] == asset)
            .max_by_key(|r| r["value"]["version"].as_i64())
            .unwrap_or_else(|| panic!("no twin of {asset}"))
    };
    let van1 = last("van-1");
    assert_eq!(van1["value"]["version"], 2);
    assert_eq!(van1["value"]["battery_pct"], 70.0);
    assert_eq!(van1["value"]["temperature_c"], 9.0);
    let van2 = last("van-2");
    assert_eq!(van2["value"]["battery_pct"], serde_json::Value::Null);
    assert_eq!(van2["value"]["speed_kmh"], 50.0);
    let changelog_ids: std::collections::HashSet<_> =
        twins.iter().map(|r| r["schema_id"].clone()).collect();
    assert_eq!(changelog_ids.len(), 1, "one twin schema: {changelog_ids:?}");
    let alerts = consume(&registry, &bootstrap, "twin-alerts", 1);
    assert_eq!(alerts[0]["value"]["code"], "TEMP_BREACH");
    assert_eq!(alerts[0]["value"]["state"], "RAISED");

    // The registry holds twinflow's subjects, registered under topic-value.
    let subjects = registry.get("/subjects").await;
    for s in [
        "telemetry-value",
        "twin-changelog-value",
        "twin-alerts-value",
    ] {
        assert!(
            subjects.as_array().unwrap().iter().any(|x| x == s),
            "{s} in {subjects}"
        );
    }
    let registered = registry
        .get("/subjects/twin-changelog-value/versions/latest")
        .await;
    assert_eq!(
        serde_json::json!(registered["id"]),
        *changelog_ids.iter().next().unwrap()
    );

    // Bad input is dead-lettered with the reason.
    let dead = p.read("twin-dead-letter", 2, Duration::from_secs(30));
    let messages: Vec<_> = dead
        .iter()
        .map(|m| header(m, "twinflow.error.message").unwrap().to_owned())
        .collect();
    assert!(
        messages[0].contains("schema id 9999")
            && messages[0].contains("not in the schema registry"),
        "{messages:?}"
    );
    assert!(messages[1].contains("magic byte"), "{messages:?}");

    // A new instance with an empty store restores from the Confluent-framed changelog.
    p.stop().await;
    let mut q = TestPipeline::new(&bootstrap, confluent_topology(dir.path()), &[]);
    q.group = p.group.clone();
    q.registry = Some(registry.config());
    q.start();
    produce(
        dir.path(),
        &registry,
        &bootstrap,
        &own,
        &[reading(
            "van-1",
            t0 + 3000,
            serde_json::json!({"battery_pct": 60.0}),
        )],
    );
    let twins = consume(&registry, &bootstrap, "twin-changelog", 4);
    let van1 = twins
        .iter()
        .find(|r| r["key"] == "van-1" && r["value"]["version"] == 3)
        .expect("van-1 version 3: the restored twin moved on");
    assert_eq!(van1["value"]["battery_pct"], 60.0, "{van1}");
    assert_eq!(
        q.changelog_raw_first_byte(),
        0,
        "still Confluent-framed after the restore"
    );
    q.stop().await;
}

impl TestPipeline {
    fn changelog_raw_first_byte(&self) -> u8 {
        let m = self.read("twin-changelog", 1, Duration::from_secs(10));
        m[0].payload().unwrap()[0]
    }
}
