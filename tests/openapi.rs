//! The OpenAPI document (`src/api/openapi.json`, served at `/openapi.json`) matches the
//! server: schemathesis generates requests from it, valid and invalid, and checks every
//! answer against it (status codes, content types, response schemas, that invalid input is
//! refused and valid input accepted), also following the document's links from lists to
//! single twins. The live stream is left out: it never ends. The desired-state write runs
//! with a write credential.

mod common;

use common::{on_embedded, vehicle_topology, venv, wait_fleet};
use twinflow::config::Secret;

const WRITE: &str = "schemathesis-write-token-0123";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_matches_the_server() {
    let (_kafka, mut p) = on_embedded(vehicle_topology());
    p.writers = [("schemathesis".to_owned(), Secret(WRITE.into()))].into();
    // Generated writes hit few twins many times: the rate limit is not under test here.
    p.desired_writes_per_minute = 1_000_000;
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
    let run = |args: Vec<String>| {
        let cwd = scratch.path().to_owned();
        let base = base.clone();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(venv().join("bin/schemathesis"))
                .args(["run", &format!("{base}/openapi.json")])
                .args(args)
                .args(["--max-examples", "30", "--workers", "1"])
                .args(["--generation-deterministic", "--request-timeout", "10"])
                .env("SCHEMATHESIS_TELEMETRY", "false")
                .current_dir(cwd)
                .output()
                .expect("schemathesis runs (bash .ci/setup installs it)")
        })
    };
    let strings = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    // The reads, every check.
    let reads = run(strings(&[
        "--checks",
        "all",
        "--exclude-operation-id",
        "stream",
        "--exclude-operation-id",
        "setDesired",
        "--exclude-operation-id",
        "ingest",
        "--exclude-operation-id",
        "ingestAsset",
        "--exclude-operation-id",
        "simulate",
    ]))
    .await
    .unwrap();
    // The writes (and the simulation, whose rule codes only the model knows), with a write
    // credential: every check but that schema-valid input is accepted, since only the model
    // knows which properties are writable and in range (the document serves every model).
    let auth = format!("Authorization: Bearer {WRITE}");
    let writes = run(strings(&[
        "--checks",
        "all",
        "--exclude-checks",
        "positive_data_acceptance",
        "--include-operation-id",
        "setDesired",
        "--include-operation-id",
        "ingest",
        "--include-operation-id",
        "ingestAsset",
        "--include-operation-id",
        "simulate",
        "--phases",
        "examples,coverage,fuzzing",
        "--header",
        &auth,
    ]))
    .await
    .unwrap();
    for out in [reads, writes] {
        let report = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{report}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(report.contains(" passed"), "{report}");
    }
    p.stop().await;
}
