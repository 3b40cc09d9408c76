//! `twinflow backtest` as an operator runs it: an hour of three trucks' readings (record
//! timestamps controlled, some outside the window) on the embedded cluster, replayed by the
//! binary through the shipped model and a candidate without TEMP_BREACH's hysteresis and with
//! LOW_BATTERY at 20 %. The figures equal what a plain count of the same readings says
//! (raises, clears, flaps, time active, the assets that differ), the silent truck turns
//! OFFLINE on its partition's clock, and nothing is written to any topic.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{on_embedded, root, vehicle_topology};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::Value;

const MINUTE: i64 = 60_000;

/// Raises, clears and flaps (a raise within 10 minutes of a clear) of a rule raising above
/// `raise` and clearing at or below `clear`, over `values` a minute apart.
fn count(values: &[f64], raise: f64, clear: f64) -> (u64, u64, u64) {
    let (mut raised, mut last_clear) = (false, None::<usize>);
    let (mut raises, mut clears, mut flaps) = (0, 0, 0);
    for (m, v) in values.iter().enumerate() {
        if !raised && *v > raise {
            raised = true;
            raises += 1;
            flaps += u64::from(last_clear.is_some_and(|c| m - c <= 10));
        } else if raised && *v <= clear {
            raised = false;
            clears += 1;
            last_clear = Some(m);
        }
    }
    (raises, clears, flaps)
}

fn ends(bootstrap: &str, topics: &[String]) -> BTreeMap<(String, i32), i64> {
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap();
    let mut out = BTreeMap::new();
    for topic in topics {
        let metadata = c
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .unwrap();
        for p in metadata.topics()[0].partitions() {
            let (_, high) = c
                .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
                .unwrap();
            out.insert((topic.clone(), p.id()), high);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backtest_compares_the_live_model_with_a_candidate_and_writes_nothing() {
    let (kafka, p) = on_embedded(vehicle_topology());
    let bootstrap = kafka.bootstrap_servers();
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .unwrap();
    let t0 = 1_800_000_000_000_i64;
    // truck-a's temperature wanders around 8 °C; truck-b's battery drains from 40 %;
    // truck-c reports for ten minutes and falls silent.
    let temperature = |m: i64| [7.7, 8.2, 7.9, 8.3][m.rem_euclid(4) as usize];
    let battery = |m: i64| 40.0 - 0.5 * m as f64;
    let mut records = Vec::new();
    for m in -10..70_i64 {
        records.push(("truck-a", m, vec![("temperature_c", temperature(m))]));
        records.push(("truck-b", m, vec![("battery_pct", battery(m))]));
        if m < 10 {
            records.push(("truck-c", m, vec![("speed_kmh", 50.0)]));
        }
    }
    let topic = p.topology.topics.telemetry.name.clone();
    for (asset, m, values) in &records {
        let value = p.encode(asset, t0 + m * MINUTE, values);
        let record = FutureRecord::to(&topic)
            .key(*asset)
            .payload(&value)
            .timestamp(t0 + m * MINUTE);
        producer
            .send(record, Duration::from_secs(10))
            .await
            .unwrap();
    }
    let topics: Vec<String> = p
        .topology
        .topics
        .all()
        .iter()
        .map(|t| t.name.clone())
        .collect();
    let before = ends(&bootstrap, &topics);

    let dir = tempfile::tempdir().unwrap();
    let shipped = std::fs::read_to_string(root().join("topology/vehicle.toml")).unwrap();
    let schemas = format!("\"{}/", root().join("schemas").display());
    let candidate = shipped
        .replace("\"../schemas/", &schemas)
        .replace("clear_threshold = 7.5\n", "")
        .replacen(
            "op = \"<\"\nthreshold = 15.0",
            "op = \"<\"\nthreshold = 20.0",
            1,
        );
    assert_ne!(candidate, shipped.replace("\"../schemas/", &schemas));
    std::fs::write(dir.path().join("candidate.toml"), candidate).unwrap();
    let config = common::config_file(dir.path(), &bootstrap, &vehicle_topology());
    let (from, to) = (t0, t0 + 60 * MINUTE);
    let run = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_twinflow"))
            .args(["backtest", "--config"])
            .arg(&config)
            .arg("--model")
            .arg(dir.path().join("candidate.toml"))
            .args([
                "--from",
                &twinflow::codec::rfc3339(from),
                "--to",
                &to.to_string(),
            ])
            .arg("--json")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        ends(&bootstrap, &topics),
        before,
        "the backtest wrote nothing"
    );

    let window: Vec<i64> = (0..60).collect();
    let in_window = records
        .iter()
        .filter(|(_, m, _)| window.contains(m))
        .count();
    assert_eq!(
        report["readings"], in_window,
        "only the window's records: {report:#}"
    );
    let figures = |side: &str, code: &str| -> Value {
        let rules = report[side]["rules"].as_array().unwrap();
        let rule = rules
            .iter()
            .find(|r| r[0] == code)
            .unwrap_or_else(|| panic!("{side} has no {code}: {report:#}"));
        rule[1].clone()
    };
    let temperatures: Vec<f64> = window.iter().map(|m| temperature(*m)).collect();
    for (side, clear) in [("live", 7.5), ("candidate", 8.0)] {
        let (raises, clears, flaps) = count(&temperatures, 8.0, clear);
        let f = figures(side, "TEMP_BREACH");
        assert_eq!(
            (&f["raises"], &f["clears"], &f["flaps"]),
            (&raises.into(), &clears.into(), &flaps.into()),
            "{side}: {f}"
        );
    }
    // LOW_BATTERY: raised once the battery is below the threshold, active until the end.
    for (side, threshold) in [("live", 15.0), ("candidate", 20.0)] {
        let first = window.iter().find(|m| battery(**m) < threshold).unwrap();
        let f = figures(side, "LOW_BATTERY");
        assert_eq!(
            (&f["raises"], &f["clears"]),
            (&1.into(), &0.into()),
            "{side}: {f}"
        );
        let active = (60 - first) as f64 * 60.0;
        assert_eq!(f["active_seconds"], active, "{side}: {f}");
    }
    // truck-c turns OFFLINE five minutes after its last reading, under either model.
    for side in ["live", "candidate"] {
        let f = figures(side, "ASSET_OFFLINE");
        assert_eq!(
            (&f["raises"], &f["assets"]),
            (&1.into(), &1.into()),
            "{side}: {f}"
        );
    }
    assert_eq!(
        report["differing_assets"],
        serde_json::json!(["truck-a", "truck-b"]),
        "{report:#}"
    );
}
