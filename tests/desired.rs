//! Desired state end to end on the embedded mock cluster: `PATCH /twins/{id}/desired` on
//! one instance of a group of two, the owner deciding, commands and their events on Kafka,
//! convergence, a race on one version, timeouts with their alert on a controlled clock,
//! device acknowledgements, credentials and the rate limit.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{TestPipeline, on_embedded, vehicle_topology};
use rdkafka::Message;
use twinflow::config::Secret;

const READ: &str = "read-token-0123456789";
const WRITE: &str = "ops-write-token-0123456789";

/// A PATCH of `body` with `token`, and any extra header; the status and JSON answer.
async fn patch(
    p: &TestPipeline,
    path: &str,
    token: Option<&str>,
    if_match: Option<&str>,
    body: &str,
) -> (u16, serde_json::Value, Option<String>) {
    let mut r = reqwest::Client::new()
        .patch(format!("http://{}{path}", p.http.unwrap()))
        .header("content-type", "application/merge-patch+json")
        .body(body.to_owned());
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    if let Some(v) = if_match {
        r = r.header("if-match", v);
    }
    let r = r.send().await.unwrap();
    let retry = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or_default(), retry)
}

async fn get(p: &TestPipeline, path: &str) -> (u16, serde_json::Value) {
    let r = reqwest::Client::new()
        .get(format!("http://{}{path}", p.http.unwrap()))
        .bearer_auth(READ)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or_default())
}

/// Waits until `GET path` on `p` answers 200 with a body that satisfies `check`.
async fn until(p: &TestPipeline, path: &str, check: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = get(p, path).await;
        if status == 200 && check(&body) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{path} never satisfied the check: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The command events so far, `n` of them, as `(command_id, state, detail)`.
fn events(p: &TestPipeline, n: usize) -> Vec<(String, String, String)> {
    let schema = apache_avro::Schema::parse_str(twinflow::codec::COMMAND_EVENT_SCHEMA).unwrap();
    p.read(
        &p.topology.topics.command_events.name,
        n,
        Duration::from_secs(30),
    )
    .iter()
    .map(|m| {
        let v = common::avro_read(&schema, m.payload().unwrap());
        let apache_avro::types::Value::Record(f) = v else {
            panic!("an event is a record")
        };
        let f: BTreeMap<_, _> = f.into_iter().collect();
        let detail = match &f["detail"] {
            apache_avro::types::Value::Union(1, d) => common::text(d),
            _ => String::new(),
        };
        (
            common::text(&f["command_id"]),
            common::text(&f["state"]),
            detail,
        )
    })
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn desired_writes_race_converge_time_out_and_answer_devices() {
    let (kafka, mut a) = on_embedded(vehicle_topology());
    let mut b = TestPipeline::new(&kafka.bootstrap_servers(), vehicle_topology(), &[]);
    b.group = a.group.clone();
    b.clock = a.clock.clone();
    for p in [&mut a, &mut b] {
        p.token = Some(Secret(READ.into()));
        p.writers = BTreeMap::from([("ops".into(), Secret(WRITE.into()))]);
        p.desired_writes_per_minute = 4;
        p.start();
    }
    // Four assets, so that both instances own some.
    let now = a.now();
    for asset in ["reefer-1", "reefer-2", "reefer-3", "reefer-4"] {
        a.send(asset, now, &[("temperature_c", 6.0), ("speed_kmh", 30.0)])
            .await;
    }
    for p in [&a, &b] {
        until(p, "/fleet", |f| f["twins"] == 4).await;
    }

    // Credentials: the read token never writes; no token is asked for one.
    let path = "/twins/reefer-1/desired";
    let set = r#"{"temperature_c": 2.0}"#;
    assert_eq!(patch(&a, path, Some(READ), None, set).await.0, 403);
    assert_eq!(patch(&a, path, None, None, set).await.0, 401);
    // The model decides what is writable and in range: 400 naming the property.
    let (status, body, _) = patch(&a, path, Some(WRITE), None, r#"{"speed_kmh": 50}"#).await;
    assert_eq!(status, 400);
    assert!(
        body["error"].as_str().unwrap().contains("speed_kmh"),
        "{body}"
    );
    let (status, body, _) = patch(&a, path, Some(WRITE), None, r#"{"temperature_c": 99}"#).await;
    assert_eq!(status, 400);
    assert!(
        body["error"].as_str().unwrap().contains("temperature_c"),
        "{body}"
    );
    assert_eq!(
        patch(&a, "/twins/nobody/desired", Some(WRITE), None, set)
            .await
            .0,
        404
    );

    // Every twin, whoever owns it, through instance a: two writers race on version 0 of
    // each; the owner accepts exactly one.
    let mut winners = BTreeMap::new();
    for asset in ["reefer-1", "reefer-2", "reefer-3", "reefer-4"] {
        let path = format!("/twins/{asset}/desired?wait=20s");
        let (one, two) = tokio::join!(
            patch(
                &a,
                &path,
                Some(WRITE),
                Some("\"0\""),
                r#"{"temperature_c": 2.0}"#
            ),
            patch(
                &a,
                &path,
                Some(WRITE),
                Some("0"),
                r#"{"temperature_c": 3.0}"#
            ),
        );
        let mut statuses = [one.0, two.0];
        statuses.sort_unstable();
        assert_eq!(statuses, [200, 409], "{one:?} {two:?}");
        let (won, lost) = if one.0 == 200 {
            (one.1, two.1)
        } else {
            (two.1, one.1)
        };
        assert_eq!(won["state"], "ISSUED");
        assert_eq!(won["set_by"], "http:ops");
        assert_eq!(lost["state"], "REJECTED");
        assert!(
            lost["detail"]
                .as_str()
                .unwrap()
                .starts_with("version_conflict"),
            "{lost}"
        );
        winners.insert(asset, won["command_id"].as_str().unwrap().to_owned());
    }
    let commands = a.read(&a.topology.topics.commands.name, 4, Duration::from_secs(30));
    let keys: Vec<_> = commands.iter().map(|m| m.key().unwrap().to_vec()).collect();
    assert_eq!(keys.len(), 4, "one command per accepted write");

    // reefer-1 reaches its setpoint: a reading at or after the write, within tolerance.
    until(&b, "/twins/reefer-1", |t| t["desired_version"] == 1).await;
    let won = |asset: &str| winners[asset].clone();
    a.send("reefer-1", a.now(), &[("temperature_c", 2.6)]).await;
    until(&b, "/twins/reefer-1", |t| {
        t["desired"].as_object().is_some_and(|d| d.is_empty())
            && t["delta"] == serde_json::json!([])
    })
    .await;

    // reefer-2's device accepts and then refuses; reefer-3's device never answers.
    let acks = a.topology.topics.acks.name.clone();
    let ack = |id: &str, result: &str| {
        format!(r#"{{"command_id": "{id}", "result": "{result}", "detail": "door open"}}"#)
    };
    a.send_to(
        &acks,
        Some(b"reefer-2"),
        Some(ack(&won("reefer-2"), "accepted").as_bytes()),
    )
    .await;
    a.send_to(
        &acks,
        Some(b"reefer-2"),
        Some(ack(&won("reefer-2"), "rejected").as_bytes()),
    )
    .await;

    // reefer-4: a write that only removes is done at once.
    let (status, body, _) = patch(
        &a,
        "/twins/reefer-4/desired?wait=20s",
        Some(WRITE),
        Some("1"),
        r#"{"temperature_c": null}"#,
    )
    .await;
    assert_eq!(
        (status, body["state"].as_str()),
        (200, Some("CONVERGED")),
        "{body}"
    );
    let removed = body["command_id"].as_str().unwrap().to_owned();

    // The clock passes converge_within (10 m): reefer-3's command times out and raises
    // DESIRED_NOT_REACHED, on a quiet partition, once.
    a.clock.advance(11 * 60_000);
    // 4 races (ISSUED, REJECTED), reefer-1 CONVERGED, reefer-2 DELIVERED and REJECTED,
    // reefer-4 SUPERSEDED and the removal CONVERGED, reefer-3 TIMED_OUT.
    let all = events(&a, 8 + 1 + 2 + 2 + 1);
    let of = |id: &str| -> Vec<(String, String)> {
        all.iter()
            .filter(|e| e.0 == id)
            .map(|e| (e.1.clone(), e.2.clone()))
            .collect()
    };
    let states = |id: &str| of(id).into_iter().map(|e| e.0).collect::<Vec<_>>();
    assert_eq!(states(&won("reefer-1")), ["ISSUED", "CONVERGED"]);
    assert_eq!(
        states(&won("reefer-2")),
        ["ISSUED", "DELIVERED", "REJECTED"]
    );
    assert_eq!(of(&won("reefer-2"))[2].1, "door open");
    assert_eq!(states(&won("reefer-3")), ["ISSUED", "TIMED_OUT"]);
    assert_eq!(states(&won("reefer-4")), ["ISSUED", "SUPERSEDED"]);
    assert_eq!(states(&removed), ["CONVERGED"]);
    let rejected = all.iter().filter(|e| e.1 == "REJECTED").count();
    assert_eq!(rejected, 4 + 1, "four lost races and one device refusal");
    // Besides the four assets going OFFLINE.
    let alerts = a.alerts(5);
    let unreached: Vec<_> = alerts
        .iter()
        .filter(|a| common::text(&a["code"]) == "DESIRED_NOT_REACHED")
        .map(|a| common::text(&a["asset_id"]))
        .collect();
    assert_eq!(unreached, ["reefer-3"]);

    // reefer-3 comes back: its device gets the unreached value again, as attempt 2.
    a.send("reefer-3", a.now(), &[("temperature_c", 6.0)]).await;
    let schema = apache_avro::Schema::parse_str(twinflow::codec::COMMAND_SCHEMA).unwrap();
    let commands = a.read(&a.topology.topics.commands.name, 5, Duration::from_secs(30));
    let again: Vec<_> = commands
        .iter()
        .map(|m| common::avro_read(&schema, m.payload().unwrap()))
        .filter_map(|v| {
            let apache_avro::types::Value::Record(f) = v else {
                panic!("a record")
            };
            let f: BTreeMap<_, _> = f.into_iter().collect();
            (f["attempt"] == apache_avro::types::Value::Long(2))
                .then(|| common::text(&f["command_id"]))
        })
        .collect();
    assert_eq!(again, [won("reefer-3")]);

    // A device repeating itself, or naming a command nobody knows, changes nothing.
    a.send_to(
        &acks,
        Some(b"reefer-2"),
        Some(ack(&won("reefer-2"), "done").as_bytes()),
    )
    .await;
    a.send_to(
        &acks,
        Some(b"reefer-2"),
        Some(ack("no-such-command", "done").as_bytes()),
    )
    .await;
    let noops = || {
        a.metrics().total("twinflow_command_noops_total")
            + b.metrics().total("twinflow_command_noops_total")
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while noops() < 2 {
        assert!(Instant::now() < deadline, "the no-ops were not counted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // The rate limit: four writes a minute per asset, in a burst or spread out.
    let body = r#"{"temperature_c": 5.0}"#;
    for _ in 0..4 {
        assert_eq!(
            patch(&a, "/twins/reefer-4/desired", Some(WRITE), None, body)
                .await
                .0,
            202
        );
    }
    let (status, _, retry) = patch(&a, "/twins/reefer-4/desired", Some(WRITE), None, body).await;
    assert_eq!((status, retry.as_deref()), (429, Some("15")));
    a.clock.advance(15_000);
    assert_eq!(
        patch(&a, "/twins/reefer-4/desired", Some(WRITE), None, body)
            .await
            .0,
        202
    );

    a.stop().await;
    b.stop().await;
}

/// A model whose only timer is `converge_within` (no offline or idle): its partitions still
/// look for due timers, and an instance that restores the twin into an empty store times
/// its open command out.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restored_twin_still_times_its_command_out() {
    let (kafka, mut p) = on_embedded(common::untimed_vehicle_topology());
    p.start();
    p.send("reefer-5", p.now(), &[("temperature_c", 6.0)]).await;
    // The write after the twin exists: the inputs are separate topics.
    until(&p, "/twins/reefer-5", |t| t["version"] == 1).await;
    let write = br#"{"desired": {"temperature_c": 2.0}, "command_id": "c-restore"}"#;
    let topic = p.topology.topics.desired.name.clone();
    p.send_to(&topic, Some(b"reefer-5"), Some(write)).await;
    until(&p, "/twins/reefer-5", |t| {
        t["commands"].as_array().is_some_and(|c| c.len() == 1)
    })
    .await;
    p.stop().await;

    let mut q = TestPipeline::new(
        &kafka.bootstrap_servers(),
        common::untimed_vehicle_topology(),
        &[],
    );
    q.group = p.group.clone();
    q.clock = p.clock.clone();
    q.start();
    until(&q, "/readyz", |_| true).await;
    q.clock.advance(10 * 60_000 + 1000);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let states: Vec<String> = events(&q, 1)
            .into_iter()
            .map(|(_, state, _)| state)
            .collect();
        if states == ["ISSUED", "TIMED_OUT"] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the command never timed out: {states:?}"
        );
    }
    until(&q, "/twins/reefer-5", |t| {
        t["active_alerts"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x["code"] == "DESIRED_NOT_REACHED"))
    })
    .await;
    q.stop().await;
}
