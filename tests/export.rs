//! `twinflow export` as an ML team runs it: two days of a small fleet's twin versions (on a
//! controlled clock, through the pipeline on the embedded cluster: alerts raised, cleared and
//! acknowledged, a twin deleted), a window of them exported to Parquet by the binary, then
//! read with pyarrow, DuckDB and pandas (`tests/python/check_export.py`): the rows are
//! exactly the history's versions of the window, and as-of joins of labels never take a
//! value from after the label.

mod common;

use std::time::Duration;

use common::{header, on_embedded, untimed_vehicle_topology, venv};
use rdkafka::Message;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

const MINUTE: i64 = 60_000;
const HOUR: i64 = 60 * MINUTE;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_exported_window_is_the_history_and_joins_without_leakage() {
    let (kafka, mut p) = on_embedded(untimed_vehicle_topology());
    p.start();
    let topics = p.topology.topics.clone();
    let assets = ["reefer-1", "reefer-2", "reefer-3", "reefer-4"];
    // Two days, a reading of each asset every 40 minutes (its event time 0 to 3 minutes
    // before it is processed); temperatures swing over TEMP_BREACH's threshold and back.
    let c0 = p.now();
    let mut sent = 0;
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap_servers())
        .create()
        .unwrap();
    for step in 0..72_i64 {
        for (i, asset) in assets.iter().enumerate() {
            let i = i as i64;
            let temperature = 4.0 + 6.0 * (((step + i) % 9) as f64 / 8.0);
            let event_time = p.now() - (step + i) % 4 * MINUTE;
            let battery = 100.0 - 2.0 * step as f64;
            p.send(
                asset,
                event_time,
                &[("temperature_c", temperature), ("battery_pct", battery)],
            )
            .await;
            sent += 1;
        }
        p.wait_consumed(sent).await;
        if step == 45 {
            // An operator acknowledges reefer-1's LOW_BATTERY (raised at step 43).
            let alerts = p.alerts(1);
            let low = alerts
                .iter()
                .find(|a| {
                    common::text(&a["asset_id"]) == "reefer-1"
                        && common::text(&a["code"]) == "LOW_BATTERY"
                })
                .unwrap();
            let ack = serde_json::json!({"alert_id": common::text(&low["alert_id"]), "by": "ops"});
            let ack = ack.to_string();
            p.send_to(&topics.acks.name, Some(b"reefer-1"), Some(ack.as_bytes()))
                .await;
        }
        if step == 50 {
            // reefer-4 is deleted, with its alerts; its next reading creates it again.
            let headers = OwnedHeaders::new().insert(Header {
                key: "twinflow.control",
                value: Some("delete"),
            });
            let record = FutureRecord::<str, [u8]>::to(&topics.desired.name)
                .key("reefer-4")
                .headers(headers);
            producer
                .send(record, Duration::from_secs(10))
                .await
                .unwrap();
        }
        p.clock.advance(40 * MINUTE);
    }
    let history = &topics.history.as_ref().unwrap().name;
    // A record that is no twin, stamped inside the window (another writer, a broken tool):
    // the export leaves it out and says so.
    let junk = FutureRecord::<str, [u8]>::to(history)
        .key("junk")
        .payload(&b"\xff\x00not a twin"[..])
        .timestamp(c0 + 20 * HOUR);
    producer.send(junk, Duration::from_secs(10)).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let records = loop {
        let records = p.read(history, 1, Duration::from_secs(30));
        if records.iter().any(|m| m.payload().is_none()) {
            break records;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no tombstone of reefer-4 in the history"
        );
    };
    p.stop().await;

    // The window: from the evening of the first day to the evening of the second.
    let (from, to) = (c0 + 12 * HOUR, c0 + 36 * HOUR);
    let mut expected: Vec<(String, i64, String)> = records
        .iter()
        .filter(|m| (from..to).contains(&m.timestamp().to_millis().unwrap()))
        .filter(|m| m.key() != Some(b"junk"))
        .map(|m| {
            let asset = String::from_utf8(m.key().unwrap().to_vec()).unwrap();
            match m.payload() {
                Some(v) => {
                    let twin = p.topology.codec.decode_twin(v).unwrap();
                    (asset, twin.version, twin.status.symbol().to_owned())
                }
                None => {
                    let version = header(m, "twinflow.deleted.version")
                        .unwrap()
                        .parse()
                        .unwrap();
                    (asset, version, "DELETED".to_owned())
                }
            }
        })
        .collect();
    expected.sort();
    assert!(
        expected.len() > 100,
        "a window of {} versions",
        expected.len()
    );
    assert!(
        expected.len() < records.len(),
        "the window leaves versions out"
    );
    assert!(
        expected.iter().any(|r| r.2 == "DELETED"),
        "the deletion is in the window"
    );

    let dir = tempfile::tempdir().unwrap();
    let config = common::config_file(
        dir.path(),
        &kafka.bootstrap_servers(),
        &untimed_vehicle_topology(),
    );
    let out = dir.path().join("export");
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_twinflow"))
        .args(["export", "--config"])
        .arg(&config)
        .args(["--from", &from.to_string(), "--to"])
        .arg(twinflow::codec::rfc3339(to))
        .args(["--format", "parquet", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(
        stdout.contains(&format!("exported {} twin versions", expected.len()))
            && stdout.contains("1 not twins left out"),
        "{stdout}"
    );
    // An export never mixes with an earlier one.
    let again = std::process::Command::new(env!("CARGO_BIN_EXE_twinflow"))
        .args(["export", "--config"])
        .arg(&config)
        .args(["--from", "0", "--to", "2100-01-01T00:00:00Z", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("is not empty"));

    let check = std::process::Command::new(venv().join("bin/python"))
        .arg(common::root().join("tests/python/check_export.py"))
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let found: serde_json::Value = serde_json::from_slice(&check.stdout).unwrap();
    let rows: Vec<(String, i64, String)> = serde_json::from_value(found["rows"].clone()).unwrap();
    assert_eq!(
        rows, expected,
        "the export's rows are the window's versions, once each"
    );
    assert_eq!(found["duckdb_agrees"], true);
    assert_eq!(
        found["dates_match"], true,
        "a row's date partition is its updated_at's"
    );
    let columns: Vec<String> = serde_json::from_value(found["columns"].clone()).unwrap();
    for c in [
        "asset_id",
        "version",
        "status",
        "event_time",
        "updated_at",
        "temperature_c",
        "temperature_c_time",
        "date",
    ] {
        assert!(columns.iter().any(|x| x == c), "no column {c}: {columns:?}");
    }
    // Alerts: TEMP_BREACH raised and cleared many times, reefer-4's cleared by its
    // deletion, LOW_BATTERY still raised at the window's end and reefer-1's acknowledged.
    let alerts: Vec<(String, String, bool, Option<String>, bool)> =
        serde_json::from_value(found["alerts"].clone()).unwrap();
    let count = |f: &dyn Fn(&(String, String, bool, Option<String>, bool)) -> bool| {
        alerts.iter().filter(|a| f(a)).count()
    };
    assert!(
        count(&|a| a.1 == "TEMP_BREACH" && a.2 && a.3.is_none()) > 10,
        "{alerts:?}"
    );
    assert!(
        count(&|a| a.3.as_deref() == Some("deleted")) >= 1,
        "{alerts:?}"
    );
    assert!(count(&|a| a.1 == "LOW_BATTERY" && !a.2) >= 1, "{alerts:?}");
    assert!(count(&|a| a.1 == "LOW_BATTERY" && a.4) == 1, "{alerts:?}");
    // The joins matched labels to versions, could have leaked, and did not.
    assert!(found["pandas_matched"].as_u64().unwrap() > 100, "{found}");
    assert!(found["later_versions"].as_u64().unwrap() > 0, "{found}");
    assert_eq!(found["pandas_matched"], found["duckdb_matched"]);
    assert_eq!(found["pandas_leaks"], 0);
    assert_eq!(found["duckdb_leaks"], 0);
}
