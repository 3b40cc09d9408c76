//! The fleet page at `/`, loaded in headless Chromium while a simulated fleet keeps
//! reporting: it must show the assets, the active alerts and live events from the stream,
//! and let a user with the write credential set a desired value on a twin.
//! The screenshot is kept as a test artefact (its path is printed).

mod common;

use std::time::Duration;

use common::{on_embedded, root, vehicle_topology, venv, wait_fleet};
use tokio_util::sync::CancellationToken;
use twinflow::demo::sim::{Fleet, FleetConfig};

const WRITE: &str = "page-write-token-0123456789";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_fleet_page_shows_assets_alerts_and_live_events() {
    let (_kafka, mut p) = on_embedded(vehicle_topology());
    p.writers = [("page".to_owned(), twinflow::config::Secret(WRITE.into()))].into();
    p.start();
    // A fleet of 200 vehicles keeps reporting, about 1000 readings/s, until the check ends.
    let config = FleetConfig {
        assets: 200,
        seed: 11,
        malformed: 0.0,
        start_ms: p.now() - 120_000,
        interval_ms: 200,
    };
    let mut fleet = Fleet::new(config, &p.topology).unwrap();

    let feeding = CancellationToken::new();
    let p = std::sync::Arc::new(p);
    let feeder = {
        let (p, feeding) = (p.clone(), feeding.clone());
        tokio::spawn(async move {
            let (mut key, mut value) = (Vec::new(), Vec::new());
            while !feeding.is_cancelled() {
                for _ in 0..20 {
                    fleet.next_record(&mut key, &mut value);
                    p.send_raw(Some(&key), Some(&value)).await;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    // The page loads a snapshot first: wait until the view holds the fleet (a few
    // simulated devices stay silent from the start) and some alerts.
    wait_fleet(&p, |f| {
        f["twins"].as_u64().unwrap_or(0) >= 190
            && f["by_alert"].as_object().is_some_and(|a| !a.is_empty())
    })
    .await;
    let base = format!("http://{}", p.http.unwrap());
    // A reefer the view holds, so the page plots it.
    let twins: serde_json::Value = reqwest::get(format!("{base}/twins?limit=1000"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let reefer = twins["twins"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["asset_id"].as_str())
        .find(|id| id.starts_with("reefer"))
        .unwrap()
        .to_owned();

    let screenshot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("fleet-page.png");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(venv().join("bin/python"))
            .arg(root().join("tests/python/check_page.py"))
            .arg(format!("{base}/"))
            .arg("--screenshot")
            .arg(&screenshot)
            .args(["--select", &reefer, "--desired", "temperature_c=4.5"])
            .args(["--write-token", WRITE])
            .output()
            .expect("python runs")
    })
    .await
    .unwrap();
    feeding.cancel();
    feeder.await.unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    println!("{report}");
    println!(
        "screenshot: {}",
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join("fleet-page.png")
            .display()
    );
    assert!(
        out.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let figures: serde_json::Value = serde_json::from_str(report.lines().last().unwrap()).unwrap();
    assert!(figures["assets"].as_u64().unwrap() >= 190, "{figures}");
    assert!(figures["alert_rows"].as_u64().unwrap() > 0, "{figures}");
    assert!(
        figures["events_received"].as_u64().unwrap() > 0,
        "{figures}"
    );
    // The twin panel set a desired value with the write credential: the owner issued the
    // command (or found it reached at once), and the panel shows the value.
    let result = figures["desired_result"].as_str().unwrap();
    assert!(
        result.starts_with("200 ISSUED") || result.starts_with("200 CONVERGED"),
        "{figures}"
    );
    assert!(figures["desired_rows"].as_u64().unwrap() >= 1, "{figures}");
    let Ok(mut p) = std::sync::Arc::try_unwrap(p) else {
        panic!("the feeder is done")
    };
    p.stop().await;
}
