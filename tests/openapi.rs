//! The OpenAPI document (`src/api/openapi.json`, served at `/openapi.json`) matches the
//! server: schemathesis generates requests from it, valid and invalid, and checks every
//! answer against it (status codes, content types, response schemas, that invalid input is
//! refused and valid input accepted), also following the document's links from lists to
//! single twins. The live stream is left out: it never ends.

mod common;

use std::time::{Duration, Instant};

use common::{TestPipeline, vehicle_topology, venv};
use twinflow::embedded::EmbeddedKafka;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_matches_the_server() {
    let kafka = EmbeddedKafka::start(1).unwrap();
    let mut p = TestPipeline::new(&kafka.bootstrap_servers(), vehicle_topology(), &[]);
    for spec in p.topology.topics.all() {
        kafka.create_topic(&spec.name, spec.partitions).unwrap();
    }
    p.start();
    let t0 = p.now() - 60_000;
    for i in 0..20 {
        let temperature = if i % 4 == 0 { 9.5 } else { 4.0 };
        let values = [
            ("lat", 52.0 + f64::from(i) / 100.0),
            ("lng", 4.0),
            ("temperature_c", temperature),
            ("battery_pct", 50.0),
        ];
        p.send(&format!("van-{i:02}"), t0 + i64::from(i), &values)
            .await;
    }
    let base = format!("http://{}", p.http.unwrap());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let fleet: serde_json::Value = reqwest::get(format!("{base}/fleet"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if fleet["twins"] == 20 {
            break;
        }
        assert!(Instant::now() < deadline, "{fleet}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // schemathesis keeps its state in its working directory: a scratch one.
    let scratch = tempfile::tempdir().unwrap();
    let cwd = scratch.path().to_owned();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(venv().join("bin/schemathesis"))
            .args(["run", &format!("{base}/openapi.json")])
            .args(["--checks", "all", "--exclude-operation-id", "stream"])
            .args(["--max-examples", "30", "--workers", "1"])
            .args(["--generation-deterministic", "--request-timeout", "10"])
            .env("SCHEMATHESIS_TELEMETRY", "false")
            .current_dir(cwd)
            .output()
            .expect("schemathesis runs (bash .ci/setup installs it)")
    })
    .await
    .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(report.contains(" passed"), "{report}");
    p.stop().await;
}
