//! The OpenAPI document (`src/api/openapi.json`, served at `/openapi.json`) matches the
//! server: schemathesis generates requests from it, valid and invalid, and checks every
//! answer against it (status codes, content types, response schemas, that invalid input is
//! refused and valid input accepted), also following the document's links from lists to
//! single twins. The live stream is left out: it never ends.

mod common;

use common::{on_embedded, vehicle_topology, venv, wait_fleet};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_matches_the_server() {
    let (_kafka, mut p) = on_embedded(vehicle_topology());
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
    wait_fleet(&p, |f| f["twins"] == 20).await;
    let base = format!("http://{}", p.http.unwrap());

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
