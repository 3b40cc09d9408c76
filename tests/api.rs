//! The twin API against running pipelines on the embedded mock cluster: three instances in
//! one group, each owning part of the partitions, answer alike for every twin; filters,
//! paging, fleet counts, errors, the bearer token, and the live stream (fast, filtered, and
//! a slow client dropped without stalling the pipeline).

mod common;

use std::collections::{BTreeSet, HashMap};
use std::io::{Read as _, Write as _};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{TestPipeline, on_embedded, vehicle_topology};
use twinflow::config::Secret;
use twinflow::demo::embedded::EmbeddedKafka;

fn cluster() -> EmbeddedKafka {
    on_embedded(vehicle_topology()).0
}

async fn get(p: &TestPipeline, path: &str) -> (u16, serde_json::Value) {
    let r = reqwest::get(format!("http://{}{path}", p.http.unwrap()))
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}

/// Waits until `check` holds for what `path` returns on every instance.
async fn until_all(ps: &[&TestPipeline], path: &str, check: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut all = true;
        for p in ps {
            let (status, body) = get(p, path).await;
            all &= status == 200 && check(&body);
        }
        if all {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{path} did not settle on every instance"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn any_instance_answers_for_any_twin_with_filters_paging_and_errors() {
    let kafka = cluster();
    let bootstrap = kafka.bootstrap_servers();
    let mut ps: Vec<TestPipeline> = (0..3)
        .map(|_| TestPipeline::new(&bootstrap, vehicle_topology(), &[]))
        .collect();
    let group = ps[0].group.clone();
    for p in &mut ps {
        p.group = group.clone();
        p.start();
    }
    let t0 = ps[0].now() - 60_000;
    // 30 assets on a line of latitudes 50.0..52.9; every third one too warm.
    for i in 0..30 {
        let temperature = if i % 3 == 0 { 9.5 } else { 4.0 };
        ps[0]
            .send(
                &format!("van-{i:02}"),
                t0 + i,
                &[
                    ("lat", 50.0 + f64::from(i as u8) / 10.0),
                    ("lng", 4.0),
                    ("speed_kmh", 30.0),
                    ("temperature_c", temperature),
                ],
            )
            .await;
    }
    let refs: Vec<&TestPipeline> = ps.iter().collect();
    until_all(&refs, "/fleet", |b| b["twins"] == 30).await;
    // Once the group settles (a partition on its way between instances belongs to none),
    // the instances own every partition between them, and all give the same answers.
    let deadline = Instant::now() + Duration::from_secs(30);
    let owned: Vec<usize> = loop {
        let mut v = Vec::new();
        for p in &ps {
            let (_, ready) = get(p, "/readyz").await;
            v.push(ready["partitions"].as_array().map_or(0, Vec::len));
        }
        if v.iter().sum::<usize>() == 4 || Instant::now() > deadline {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(owned.iter().sum::<usize>(), 4, "{owned:?}");
    for id in ["van-00", "van-07", "van-29"] {
        let answers: Vec<_> = {
            let mut v = Vec::new();
            for p in &ps {
                v.push(get(p, &format!("/twins/{id}")).await);
            }
            v
        };
        assert_eq!(answers[0].0, 200);
        assert_eq!(answers[0].1["asset_id"], id);
        assert!(answers.iter().all(|a| *a == answers[0]), "{answers:?}");
    }
    let p = &ps[1];

    // Paging: every twin once, in asset id order.
    let mut seen = Vec::new();
    let mut after = String::new();
    loop {
        let (status, page) = get(p, &format!("/twins?limit=7{after}")).await;
        assert_eq!(status, 200);
        for t in page["twins"].as_array().unwrap() {
            seen.push(t["asset_id"].as_str().unwrap().to_owned());
        }
        match page["next_after"].as_str() {
            Some(next) => after = format!("&after={next}"),
            None => break,
        }
    }
    let sorted: Vec<_> = (0..30).map(|i| format!("van-{i:02}")).collect();
    assert_eq!(seen, sorted);

    // Filters.
    let (_, hot) = get(p, "/twins?alert=TEMP_BREACH&limit=100").await;
    let hot: BTreeSet<_> = hot["twins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["asset_id"].as_str().unwrap().to_owned())
        .collect();
    let expected: BTreeSet<_> = (0..30).step_by(3).map(|i| format!("van-{i:02}")).collect();
    assert_eq!(hot, expected);
    let (_, boxed) = get(p, "/twins?bbox=50.95,3.5,51.45,4.5").await;
    let boxed: Vec<_> = boxed["twins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["asset_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(boxed, ["van-10", "van-11", "van-12", "van-13", "van-14"]);
    // A box crossing the antimeridian holds lng 4; one with south > north holds nothing.
    let (_, across) = get(p, "/twins?bbox=50.95,170,51.45,5").await;
    assert_eq!(across["twins"].as_array().unwrap().len(), 5);
    let (status, empty) = get(p, "/twins?bbox=60,0,50,10").await;
    assert_eq!((status, empty["twins"].as_array().unwrap().len()), (200, 0));
    let (_, active) = get(p, "/twins?status=ACTIVE&limit=1000").await;
    assert_eq!(active["twins"].as_array().unwrap().len(), 30);
    let (_, alerts) = get(p, "/alerts?code=TEMP_BREACH&severity=CRITICAL").await;
    assert_eq!(alerts["alerts"].as_array().unwrap().len(), 10);
    assert_eq!(alerts["alerts"][0]["asset_id"], "van-00");
    let (_, none) = get(p, "/alerts?severity=INFO").await;
    assert_eq!(none["alerts"].as_array().unwrap().len(), 0);
    let (_, fleet) = get(p, "/fleet").await;
    assert_eq!(fleet["by_status"]["ACTIVE"], 30);
    assert_eq!(fleet["by_alert"]["TEMP_BREACH"], 10);

    // Errors say what was wrong.
    for (path, status, says) in [
        ("/twins/nobody", 404, "nobody"),
        ("/twins?limit=0", 400, "limit"),
        ("/twins?limit=5000", 400, "limit"),
        ("/twins?status=PARKED", 400, "PARKED"),
        ("/twins?bbox=1,2,3", 400, "bbox"),
        ("/twins?bbox=1,2,3,x", 400, "bbox"),
        ("/twins?bbox=1,2,3,NaN", 400, "bbox"),
        ("/twins?colour=red", 400, "colour"),
        ("/alerts?severity=LOUD", 400, "LOUD"),
        ("/nowhere", 404, "no such endpoint"),
    ] {
        let (got, body) = get(p, path).await;
        assert_eq!(got, status, "{path}: {body}");
        let message = body["error"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{path}: {body}");
    }
    let long = format!("/twins?after={}", "x".repeat(3000));
    assert_eq!(get(p, &long).await.0, 400, "query string too long");
    let long = format!("/alerts?after={}", "x".repeat(600));
    assert_eq!(get(p, &long).await.0, 400, "not an asset id");

    for p in &mut ps {
        p.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bearer_token_guards_everything_but_healthz() {
    let kafka = cluster();
    let mut p = TestPipeline::new(&kafka.bootstrap_servers(), vehicle_topology(), &[]);
    p.token = Some(Secret("t0ken".into()));
    p.start();
    let base = format!("http://{}", p.http.unwrap());
    let client = reqwest::Client::new();
    for path in [
        "/twins",
        "/fleet",
        "/metrics",
        "/",
        "/openapi.json",
        "/twins/x",
    ] {
        let r = client.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert!(body["error"].as_str().unwrap().contains("bearer token"));
        let wrong = client
            .get(format!("{base}{path}"))
            .bearer_auth("guess")
            .send()
            .await
            .unwrap();
        assert_eq!(wrong.status(), 401, "{path}");
    }
    let ok = client
        .get(format!("{base}/fleet"))
        .bearer_auth("t0ken")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let by_param = client
        .get(format!("{base}/fleet?access_token=t0ken"))
        .send()
        .await
        .unwrap();
    assert_eq!(by_param.status(), 200);
    let health = client.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    p.stop().await;
}

/// A client of the whole stream with a 4 kB receive window, its request sent.
fn stream_client(p: &TestPipeline) -> std::net::TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&p.http.unwrap().into()).unwrap();
    let mut client: std::net::TcpStream = socket.into();
    write!(
        client,
        "GET /twins/stream HTTP/1.1\r\nHost: twinflow\r\nAccept: text/event-stream\r\n\r\n"
    )
    .unwrap();
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_stream_brings_changes_within_a_second_survives_bursts_and_drops_a_slow_client() {
    let kafka = cluster();
    let mut p = TestPipeline::new(&kafka.bootstrap_servers(), vehicle_topology(), &[]);
    p.start();
    let t0 = p.now() - 60_000;
    p.send("van-1", t0, &[("temperature_c", 4.0)]).await;
    until_all(&[&p], "/fleet", |b| b["twins"] == 1).await;

    // A slow client: asks for everything and never reads, with a small receive window.
    let mut slow = stream_client(&p);

    // A client filtered to one asset's alerts.
    let url = format!("http://{}/twins/stream?asset=van-1", p.http.unwrap());
    let response = reqwest::get(&url).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response;
    // The stream is subscribed once the headers are out; a reading for another asset is
    // filtered out, one for van-1 arrives.
    p.send("van-2", t0 + 1, &[("temperature_c", 4.0)]).await;
    let sent = Instant::now();
    p.send("van-1", t0 + 2, &[("temperature_c", 9.0)]).await;
    let mut text = String::new();
    while !(text.contains("event: twin") && text.contains("event: alert")) {
        let chunk = tokio::time::timeout(Duration::from_secs(5), body.chunk())
            .await
            .unwrap_or_else(|_| panic!("no event within 5 s; so far {text:?}"))
            .unwrap()
            .expect("the stream goes on");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let latency = sent.elapsed();
    assert!(latency < Duration::from_secs(1), "took {latency:?}");
    assert!(!text.contains("van-2"), "{text}");
    assert!(
        text.contains("\"TEMP_BREACH\"") && text.contains("\"RAISED\""),
        "{text}"
    );

    // A client that keeps up with the average rate but not with a burst: it reads at most
    // about 4 kB (a few events) per millisecond, through a small receive window. In a
    // thread of its own, it notes per asset the version of the last twin it got, and
    // whether it was closed.
    let seen = Arc::new(Mutex::new((HashMap::<String, u64>::new(), false)));
    let reader = {
        let mut prompt = stream_client(&p);
        let seen = seen.clone();
        std::thread::spawn(move || {
            let mut pending = String::new();
            let mut buf = [0u8; 4096];
            while let Ok(got @ 1..) = prompt.read(&mut buf) {
                pending.push_str(&String::from_utf8_lossy(&buf[..got]));
                while let Some(end) = pending.find("\n\n") {
                    let piece: String = pending.drain(..end + 2).collect();
                    let Some(start) = piece.find("event: ") else {
                        continue;
                    };
                    let event = &piece[start..];
                    let mut seen = seen.lock().unwrap();
                    if event.starts_with("event: close") {
                        seen.1 = true;
                    } else if let Some(data) = event.strip_prefix("event: twin\ndata: ") {
                        let twin: serde_json::Value = serde_json::from_str(data.trim()).unwrap();
                        let id = twin["asset_id"].as_str().unwrap().to_owned();
                        seen.0.insert(id, twin["version"].as_u64().unwrap());
                    }
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };

    // A burst: far more changes than were once kept per client (4096), and than socket
    // buffers hold, of 500 assets. The pipeline keeps going; the client that keeps up with
    // the average rate is not dropped and ends with the latest twin of every asset.
    let n = 30_000;
    let q = &p;
    for chunk in (0..n).collect::<Vec<i64>>().chunks(1000) {
        let sends = chunk.iter().map(|i| {
            let asset = format!("bulk-{}", i % 500);
            let bytes = q.encode(&asset, t0 + 10 + i, &[("speed_kmh", *i as f64 % 100.0)]);
            async move { q.send_raw(Some(asset.as_bytes()), Some(&bytes)).await }
        });
        futures::future::join_all(sends).await;
    }
    p.wait_consumed(3 + n as u64).await;
    until_all(&[&p], "/fleet", |b| b["twins"] == 502).await;
    // Every reading is newer than the last of its asset, so each makes a version.
    let latest: HashMap<String, u64> = (0..500)
        .map(|i| (format!("bulk-{i}"), n as u64 / 500))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (closed, current) = {
            let seen = seen.lock().unwrap();
            let current = latest
                .iter()
                .filter(|(id, v)| seen.0.get(*id) == Some(*v))
                .count();
            (seen.1, current)
        };
        assert!(!closed, "the client that keeps up on average was dropped");
        if current == latest.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the client that keeps up on average has the latest twin of {current} of 500 assets"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(p.metrics().stream_dropped.get(), 0);

    // More assets changing than the stream keeps: the client that never reads has lost
    // changes, so it is dropped.
    let wide = twinflow::view::STREAM_BUFFER as i64 + 1000;
    for chunk in (0..wide).collect::<Vec<i64>>().chunks(1000) {
        let sends = chunk.iter().map(|i| {
            let asset = format!("wide-{i}");
            let bytes = q.encode(&asset, t0 + 10, &[("speed_kmh", 1.0)]);
            async move { q.send_raw(Some(asset.as_bytes()), Some(&bytes)).await }
        });
        futures::future::join_all(sends).await;
    }
    let twins = 502 + wide;
    p.wait_consumed(3 + (n + wide) as u64).await;
    until_all(&[&p], "/fleet", |b| b["twins"] == twins).await;

    // The slow client, reading at last, is told why it is dropped, and the stream ends.
    slow.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 65536];
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = slow.read(&mut buf).unwrap();
        seen.extend_from_slice(&buf[..got]);
        let text = String::from_utf8_lossy(&seen);
        if got == 0 || text.contains("event: close") {
            assert!(
                text.contains("client too slow"),
                "{}",
                &text[text.len().saturating_sub(500)..]
            );
            break;
        }
        assert!(Instant::now() < deadline, "no close event");
    }
    assert_eq!(p.metrics().stream_dropped.get(), 1);
    assert_eq!(p.metrics().view_twins.get(), twins);
    p.stop().await;
    reader.join().unwrap();

    // A restart counts the twins its view already holds, then reads on.
    p.start();
    until_all(&[&p], "/fleet", |b| {
        let by_status: u64 = b["by_status"]
            .as_object()
            .map_or(0, |m| m.values().filter_map(|n| n.as_u64()).sum());
        b["twins"] == twins && by_status == twins as u64 && b["caught_up"] == true
    })
    .await;
    p.stop().await;
}

/// A processing-only instance (`[view] enabled = false`) processes and serves its operations
/// endpoints, keeps no fleet view, and says so on the twin API (503); an instance with the
/// view on the same cluster answers for the twins it processed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_processing_only_instance_keeps_no_view_and_says_so() {
    let (kafka, mut p) = on_embedded(vehicle_topology());
    p.view.enabled = false;
    p.start();
    let t0 = p.now();
    for i in 0..5_i64 {
        p.send(&format!("van-{i}"), t0 - 1000 + i, &[("speed_kmh", 40.0)])
            .await;
    }
    p.wait_consumed(5).await;
    assert_eq!(p.changelog(5).len(), 5, "the twins reach the changelog");
    for path in ["/twins/van-0", "/twins?limit=5", "/alerts", "/fleet", "/"] {
        let (status, body) = get(&p, path).await;
        assert_eq!(status, 503, "{path}: {body}");
    }
    assert_eq!(get(&p, "/healthz").await.0, 200);
    let metrics = reqwest::get(format!("http://{}/metrics", p.http.unwrap()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("twinflow_view_twins 0"),
        "no view: {metrics}"
    );

    let mut q = TestPipeline::new(&kafka.bootstrap_servers(), vehicle_topology(), &[]);
    q.group = format!("{}-viewer", p.group);
    q.start();
    until_all(&[&q], "/fleet", |f| f["twins"] == 5).await;
    p.stop().await;
    q.stop().await;
}
