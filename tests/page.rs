//! The fleet page at `/`, loaded in headless Chromium while a simulated fleet keeps
//! reporting: it must show the assets, the active alerts and live events from the stream;
//! fall back to its plot while the tile server fails, and show a Leaflet map with its
//! tiles once it serves; open a twin's detail on a click (properties, alerts, a chart of
//! each numeric property over the last hour from the history endpoint, why each rule is
//! raised or not, with a forecast's prediction); run a what-if on it; and let a user with
//! the write credential set a desired value on a twin. The screenshots are kept as test
//! artefacts (their paths are printed).

mod common;

use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::{on_embedded, root, vehicle_topology, venv, wait_fleet};
use tokio_util::sync::CancellationToken;
use twinflow::demo::sim::{Fleet, FleetConfig};

const WRITE: &str = "page-write-token-0123456789";

/// A map tile server on loopback: while `up`, any GET is a 1x1 PNG tile; otherwise 503.
/// Returns its URL template and the number of tiles served.
fn tile_server(up: Arc<AtomicBool>) -> (String, Arc<AtomicUsize>) {
    const PNG: [u8; 69] = [
        137, 80, 78, 71, 13, 10, 26, 10, 0, 0, 0, 13, 73, 72, 68, 82, 0, 0, 0, 1, 0, 0, 0, 1, 8, 2,
        0, 0, 0, 144, 119, 83, 222, 0, 0, 0, 12, 73, 68, 65, 84, 120, 156, 99, 184, 251, 236, 29,
        0, 5, 85, 2, 178, 225, 34, 214, 17, 0, 0, 0, 0, 73, 69, 78, 68, 174, 66, 96, 130,
    ];
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "http://{}/{{z}}/{{x}}/{{y}}.png",
        listener.local_addr().unwrap()
    );
    let served = Arc::new(AtomicUsize::new(0));
    let count = served.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut request = [0u8; 4096];
            let _ = stream.read(&mut request);
            let response = if up.load(Ordering::SeqCst) {
                count.fetch_add(1, Ordering::SeqCst);
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: image/png\r\ncontent-length: {}\r\n\
                     access-control-allow-origin: *\r\nconnection: close\r\n\r\n",
                    PNG.len()
                );
                [head.as_bytes(), &PNG].concat()
            } else {
                b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    .to_vec()
            };
            let _ = stream.write_all(&response);
        }
    });
    (url, served)
}

/// Runs tests/python/check_page.py on `url` with `args`; its figures.
async fn check_page(url: &str, screenshot: &str, args: &[&str]) -> serde_json::Value {
    let screenshot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(screenshot);
    let mut command = std::process::Command::new(venv().join("bin/python"));
    command
        .arg(root().join("tests/python/check_page.py"))
        .arg(url)
        .arg("--screenshot")
        .arg(&screenshot)
        .args(args);
    let out = tokio::task::spawn_blocking(move || command.output().expect("python runs"))
        .await
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    println!("{report}screenshot: {}", screenshot.display());
    assert!(
        out.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(report.lines().last().unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_fleet_page_shows_assets_alerts_and_live_events() {
    let (_kafka, mut p) = on_embedded(vehicle_topology());
    p.writers = [("page".to_owned(), twinflow::config::Secret(WRITE.into()))].into();
    let tiles_up = Arc::new(AtomicBool::new(false));
    let (tiles, served) = tile_server(tiles_up.clone());
    p.map_tiles = Some(tiles);
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
    // page-reefer, placed among the fleet: half an hour of readings, a minute apart, its
    // temperature climbing past TEMP_BREACH's threshold at the end.
    let twins: serde_json::Value = reqwest::get(format!("{base}/twins?limit=100"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let at = twins["twins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| &t["location"])
        .find(|l| l.is_object())
        .unwrap();
    let (lat, lng) = (at["lat"].as_f64().unwrap(), at["lng"].as_f64().unwrap());
    let now = p.now();
    for i in 0..30_i64 {
        let reading = [
            ("lat", lat + 0.001 * i as f64),
            ("lng", lng),
            ("speed_kmh", 40.0 + i as f64),
            ("temperature_c", 3.0 + 0.3 * i as f64),
        ];
        p.send("page-reefer", now - (30 - i) * 60_000, &reading)
            .await;
    }
    // Its battery drains fast over the last minute: a reading every three seconds, so that
    // LOW_BATTERY_PREDICTED (a one-minute window) predicts the crossing of 15 %.
    for k in 0..21_i64 {
        let battery = [("battery_pct", 40.0 - k as f64)];
        p.send("page-reefer", now - 60_000 + 3_000 * k, &battery)
            .await;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let twin: serde_json::Value = reqwest::get(format!("{base}/twins/page-reefer"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap_or_default();
        if twin["version"] == 51 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "page-reefer never reached version 51: {twin}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The tile server fails: the page falls back to its plot, and still shows everything.
    let url = format!("{base}/");
    let plot = check_page(&url, "fleet-page-plot.png", &["--expect-map", "plot"]).await;
    assert!(plot["assets"].as_u64().unwrap() >= 190, "{plot}");
    assert!(plot["alert_rows"].as_u64().unwrap() > 0, "{plot}");
    assert!(plot["events_received"].as_u64().unwrap() > 0, "{plot}");

    // It serves: a Leaflet map with its tiles, and the detail of a clicked twin.
    tiles_up.store(true, Ordering::SeqCst);
    let args = [
        "--expect-map",
        "map",
        "--select",
        "page-reefer",
        "--desired",
        "temperature_c=4.5",
        "--write-token",
        WRITE,
        "--whatif",
        "temperature_c=5",
    ];
    let figures = check_page(&url, "fleet-page.png", &args).await;
    feeding.cancel();
    feeder.await.unwrap();
    assert!(
        served.load(Ordering::SeqCst) > 0,
        "the browser fetched tiles"
    );
    assert!(figures["assets"].as_u64().unwrap() >= 190, "{figures}");
    assert!(figures["alert_rows"].as_u64().unwrap() > 0, "{figures}");
    assert!(
        figures["events_received"].as_u64().unwrap() > 0,
        "{figures}"
    );
    // The detail: its alert, and each numeric property it reported charted from the
    // history, a point per reading.
    assert_eq!(
        figures["alert_codes"],
        serde_json::json!(["TEMP_BREACH", "LOW_BATTERY_PREDICTED"]),
        "{figures}"
    );
    // Why: TEMP_BREACH raised, the battery forecast raised on a predicted crossing.
    let rules = &figures["rules"];
    assert_eq!(rules["TEMP_BREACH"][0], "raised", "{figures}");
    assert_eq!(
        rules["LOW_BATTERY_PREDICTED"],
        serde_json::json!(["raised", "crossing"]),
        "{figures}"
    );
    // What if the reefer were at 5 °C for ten minutes: TEMP_BREACH would clear; the battery
    // forecast would stay (no battery reading changes its window).
    assert!(
        (figures["whatif_events"].as_array().unwrap())
            .contains(&serde_json::json!("TEMP_BREACH CLEARED")),
        "{figures}"
    );
    let after: Vec<&str> = figures["whatif_final"]
        .as_str()
        .unwrap()
        .split(',')
        .collect();
    assert!(
        after.contains(&"LOW_BATTERY_PREDICTED") && !after.contains(&"TEMP_BREACH"),
        "{figures}"
    );
    let charts = &figures["charts"];
    for property in ["speed_kmh", "temperature_c", "lat", "lng"] {
        assert_eq!(charts[property], 30, "{property}: {figures}");
    }
    assert_eq!(
        figures["polylines"].as_u64(),
        charts.as_object().map(|c| c.len() as u64)
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
