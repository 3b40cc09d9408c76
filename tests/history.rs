//! A twin's past through the API, from the versions the fleet view keeps: pages of
//! `GET /twins/{id}/history` in both orders, filtered by event time, and
//! `GET /twins/{id}?as_of=T` by event time and by processing time (on a controlled clock).

mod common;

use std::time::{Duration, Instant};

use common::{on_embedded, untimed_vehicle_topology};

async fn get(p: &common::TestPipeline, path: &str) -> (u16, serde_json::Value) {
    let r = reqwest::get(format!("http://{}{path}", p.http.unwrap()))
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or_default())
}

/// The versions of a history page, and its cursor.
async fn page(p: &common::TestPipeline, query: &str) -> (Vec<i64>, Option<String>) {
    let (status, body) = get(p, &format!("/twins/h-1/history?{query}")).await;
    assert_eq!(status, 200, "{query}: {body}");
    let versions = body["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["version"].as_i64().unwrap())
        .collect();
    (versions, body["next"].as_str().map(str::to_owned))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn history_pages_and_as_of_reads_by_event_and_processing_time() {
    let (_kafka, mut p) = on_embedded(untimed_vehicle_topology());
    p.view.history_versions = 25;
    p.start();
    // Thirty readings, each a new version; version v has event time t0 + (v - 1) × 10 s and
    // is processed at c0 + (v - 1) s.
    let (t0, c0) = (1_790_000_000_000_i64, p.now());
    for i in 0..30_i64 {
        p.send("h-1", t0 + i * 10_000, &[("speed_kmh", (i + 1) as f64)])
            .await;
        p.wait_consumed(i as u64 + 1).await;
        p.clock.advance(1000);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while get(&p, "/twins/h-1").await.1["version"] != 30 {
        assert!(
            Instant::now() < deadline,
            "the view never showed version 30"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The newest 25 versions are kept: 6 to 30, ten to a page.
    assert_eq!(
        page(&p, "limit=10").await,
        ((6..=15).collect(), Some("15".into()))
    );
    assert_eq!(
        page(&p, "limit=10&after=15").await,
        ((16..=25).collect(), Some("25".into()))
    );
    assert_eq!(
        page(&p, "limit=10&after=25").await,
        ((26..=30).collect(), None)
    );
    assert_eq!(
        page(&p, "limit=3&order=desc").await,
        (vec![30, 29, 28], Some("28".into()))
    );
    assert_eq!(
        page(&p, "limit=3&order=desc&after=28").await,
        (vec![27, 26, 25], Some("25".into()))
    );
    // By event time, milliseconds or RFC 3339.
    let (from, to) = (t0 + 10 * 10_000, t0 + 12 * 10_000);
    assert_eq!(
        page(&p, &format!("from={from}&to={to}")).await,
        (vec![11, 12, 13], None)
    );
    let rfc = |ms: i64| twinflow::codec::rfc3339(ms);
    assert_eq!(
        page(&p, &format!("from={}&to={}&order=desc", rfc(from), rfc(to))).await,
        (vec![13, 12, 11], None)
    );

    // As of a time: the newest version at or before it.
    let as_of = |q: String| {
        let p = &p;
        async move { get(p, &format!("/twins/h-1?{q}")).await }
    };
    let (status, twin) = as_of(format!("as_of={}", t0 + 15 * 10_000 + 5000)).await;
    assert_eq!((status, twin["version"].as_i64()), (200, Some(16)));
    assert_eq!(twin["properties"]["speed_kmh"], 16.0);
    let (status, twin) = as_of(format!("as_of={}&time=processing", c0 + 9 * 1000 + 500)).await;
    assert_eq!((status, twin["version"].as_i64()), (200, Some(10)));
    let (status, twin) = as_of(format!("as_of={}", rfc(t0 + 29 * 10_000))).await;
    assert_eq!((status, twin["version"].as_i64()), (200, Some(30)));
    // Older than the oldest kept version, or no such twin: 404 saying which.
    let (status, body) = as_of(format!("as_of={}", t0 + 1000)).await;
    assert_eq!(status, 404, "{body}");
    assert!(body["error"].as_str().unwrap().contains("history_versions"));
    assert_eq!(get(&p, "/twins/nobody/history").await.0, 404);
    for bad in [
        "order=sideways",
        "from=yesterday",
        "time=wall",
        "limit=0",
        "limit=1001",
        "colour=red",
    ] {
        let (status, body) = get(&p, &format!("/twins/h-1/history?{bad}")).await;
        assert_eq!(status, 400, "{bad}: {body}");
    }
    assert_eq!(get(&p, "/twins/h-1?as_of=soon").await.0, 400);
    p.stop().await;
}
