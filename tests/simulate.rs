//! `POST /twins/{id}/simulate` on the embedded cluster: a simulation writes nothing (every
//! topic's end, the twin and the pipeline's metrics stay as they were), and what it says
//! equals what the pipeline then writes for the same readings at the same processing times:
//! the same twins, alert events (ids included), command events and dead-letter reasons.
//! Rule overrides, the starts (now, empty, as of a time) and the limits are checked on the
//! same instance.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{TestPipeline, header, on_embedded};
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde_json::{Value, json};
use twinflow::codec::rfc3339;

const MINUTE: i64 = 60_000;

/// The end offset of every partition of every topic.
fn ends(p: &TestPipeline) -> BTreeMap<(String, i32), i64> {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &p.bootstrap)
        .create()
        .unwrap();
    let mut out = BTreeMap::new();
    for spec in p.topology.topics.all() {
        for partition in 0..spec.partitions {
            let (_, high) = consumer
                .fetch_watermarks(&spec.name, partition, Duration::from_secs(10))
                .unwrap();
            out.insert((spec.name.clone(), partition), high);
        }
    }
    out
}

/// The pipeline's counters of what it processed and wrote, as text.
fn pipeline_metrics(p: &TestPipeline) -> String {
    const COUNTERS: [&str; 12] = [
        "twinflow_records_consumed_total",
        "twinflow_twin_updates_total",
        "twinflow_twins_created_total",
        "twinflow_timers_fired_total",
        "twinflow_twin_deletions_total",
        "twinflow_command_events_total",
        "twinflow_commands_sent_total",
        "twinflow_command_noops_total",
        "twinflow_records_skipped_total",
        "twinflow_records_dead_lettered_total",
        "twinflow_alerts_emitted_total",
        "twinflow_forecast_outcomes_total",
    ];
    let families = p.metrics().registry().gather();
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&families)
        .unwrap();
    let counted: Vec<&str> = (text.lines())
        .filter(|l| COUNTERS.iter().any(|c| l.starts_with(c)))
        .collect();
    assert!(counted.len() > 5, "the counters are there: {text}");
    counted.join("\n")
}

struct Api {
    base: String,
    client: reqwest::Client,
}

impl Api {
    async fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .client
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    async fn simulate(&self, id: &str, body: &Value) -> (u16, Value) {
        self.post(id, serde_json::to_vec(body).unwrap()).await
    }

    async fn post(&self, id: &str, body: Vec<u8>) -> (u16, Value) {
        let r = self
            .client
            .post(format!("{}/twins/{id}/simulate", self.base))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    /// Waits until `GET path` answers 200 with a body `check` accepts; the body.
    async fn until(&self, path: &str, check: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (status, body) = self.get(path).await;
            if status == 200 && check(&body) {
                return body;
            }
            assert!(Instant::now() < deadline, "{path} never: {body:#}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the view has version `version` of `id`.
    async fn until_version(&self, id: &str, version: i64) -> Value {
        self.until(&format!("/twins/{id}"), |t| t["version"] == version)
            .await
    }
}

/// The readings of the scenario: `(event time offset from now in minutes, values)`; the
/// last two are refused (late, out of range).
fn scenario() -> Vec<(i64, Vec<(&'static str, f64)>)> {
    let mut readings = vec![(0, vec![("temperature_c", 9.5), ("battery_pct", 30.0)])];
    for m in 1..4 {
        readings.push((m, vec![("battery_pct", 30.0 - m as f64)]));
    }
    readings.push((-120, vec![("battery_pct", 50.0)]));
    readings.push((4, vec![("speed_kmh", 999.0)]));
    readings
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_simulation_writes_nothing_and_says_what_the_pipeline_then_writes() {
    let (_kafka, mut p, api) = started();
    // A truck whose battery drained 1 %/min for the last 15 minutes.
    let now = p.now();
    for m in 0..16 {
        let at = now - (15 - m) * MINUTE;
        p.send(
            "truck-1",
            at,
            &[
                ("speed_kmh", 60.0),
                ("temperature_c", 4.0),
                ("battery_pct", 45.0 - m as f64),
            ],
        )
        .await;
    }
    let before = api.until_version("truck-1", 16).await;
    // The counters are published after the commit, the alerts last of them: wait for the
    // batch's forecast, so that the snapshot below is settled.
    p.wait_consumed(16).await;
    let raised = [("rule", "LOW_BATTERY_PREDICTED"), ("state", "RAISED")];
    let deadline = Instant::now() + Duration::from_secs(30);
    while p
        .metrics()
        .counter("twinflow_alerts_emitted_total", &raised)
        < 1
    {
        assert!(Instant::now() < deadline, "the forecast never raised");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (ends_before, metrics_before) = (ends(&p), pipeline_metrics(&p));

    let mut steps: Vec<Value> = scenario()
        .iter()
        .map(|(m, values)| {
            let mut reading: serde_json::Map<String, Value> = values
                .iter()
                .map(|(k, v)| (k.to_string(), json!(v)))
                .collect();
            reading.insert("event_time".into(), json!(rfc3339(now + m * MINUTE)));
            json!({ "reading": reading })
        })
        .collect();
    steps.push(json!({ "advance": "10m" }));
    let (status, sim) = api
        .simulate("truck-1", &json!({ "at": now, "steps": steps }))
        .await;
    assert_eq!(status, 200, "{sim}");

    // Nothing written, nothing changed.
    assert_eq!(ends(&p), ends_before, "a topic grew");
    assert_eq!(api.get("/twins/truck-1").await.1, before);
    assert_eq!(pipeline_metrics(&p), metrics_before);

    let outcomes: Vec<(&str, &str)> = (sim["steps"].as_array().unwrap().iter())
        .map(|s| (s["kind"].as_str().unwrap(), s["outcome"].as_str().unwrap()))
        .collect();
    // Four readings applied, two refused, then the clock: OFFLINE 5 minutes after the last
    // reading, the temperature setpoint's command timed out 10 minutes after it was issued.
    assert_eq!(
        outcomes,
        [
            ("reading", "applied"),
            ("reading", "applied"),
            ("reading", "applied"),
            ("reading", "applied"),
            ("reading", "refused"),
            ("reading", "refused"),
            ("timer", "fired"),
            ("timer", "fired"),
        ],
        "{sim:#}"
    );
    let reasons: Vec<&str> = (sim["steps"].as_array().unwrap().iter())
        .filter(|s| s["outcome"] == "refused")
        .map(|s| s["reason"].as_str().unwrap())
        .collect();
    assert_eq!(reasons, ["late", "invalid"]);
    let sim_twins: Vec<&Value> = (sim["steps"].as_array().unwrap().iter())
        .filter(|s| s["outcome"] != "refused")
        .map(|s| &s["twin"])
        .collect();
    let sim_alerts: Vec<&Value> = (sim["steps"].as_array().unwrap().iter())
        .flat_map(|s| s["alerts"].as_array().into_iter().flatten())
        .collect();
    let codes: Vec<(&str, &str)> = (sim_alerts.iter())
        .map(|a| (a["code"].as_str().unwrap(), a["state"].as_str().unwrap()))
        .collect();
    // The battery was forecast before; the forecast goes stale when the truck goes OFFLINE
    // (events of one change in rule order: the model file's, then the built-in ones).
    assert_eq!(
        codes,
        [
            ("TEMP_BREACH", "RAISED"),
            ("LOW_BATTERY_PREDICTED", "CLEARED"),
            ("ASSET_OFFLINE", "RAISED"),
            ("DESIRED_NOT_REACHED", "RAISED"),
        ]
    );
    let sim_commands: Vec<&Value> = (sim["steps"].as_array().unwrap().iter())
        .flat_map(|s| s["command_events"].as_array().into_iter().flatten())
        .collect();
    assert!(
        !sim_commands.is_empty(),
        "the rule's action issues a command"
    );

    // Now the same through the pipeline, at the same processing times.
    for (m, values) in scenario() {
        p.send("truck-1", now + m * MINUTE, &values).await;
    }
    p.wait_consumed(16 + scenario().len() as u64).await;
    api.until_version("truck-1", 20).await;
    p.clock.advance(5 * MINUTE);
    api.until_version("truck-1", 21).await;
    p.clock.advance(5 * MINUTE);
    api.until_version("truck-1", 22).await;
    let ends_after = ends(&p);

    let codec = &p.topology.codec;
    // The records each topic got since the simulation.
    let new = |topic: &str| -> Vec<rdkafka::message::OwnedMessage> {
        let total = (ends_after.iter())
            .filter(|((t, _), _)| t == topic)
            .map(|(_, high)| *high as usize)
            .sum();
        let all = p.read(topic, total, Duration::from_secs(30));
        all.into_iter()
            .filter(|m| m.offset() >= ends_before[&(topic.to_owned(), m.partition())])
            .collect()
    };
    let topics = &p.topology.topics;
    let twins: Vec<Value> = new(&topics.changelog.name)
        .iter()
        .map(|m| codec.twin_json(&codec.decode_twin(m.payload().unwrap()).unwrap()))
        .collect();
    assert_eq!(twins.len(), sim_twins.len());
    for (real, simulated) in twins.iter().zip(&sim_twins) {
        assert_eq!(&real, simulated);
    }
    let alerts: Vec<Value> = new(&topics.alerts.name)
        .iter()
        .map(|m| codec.alert_json(m.payload().unwrap()).unwrap())
        .collect();
    assert_eq!(alerts.iter().collect::<Vec<_>>(), sim_alerts);
    let commands: Vec<Value> = new(&topics.command_events.name)
        .iter()
        .map(|m| twinflow::codec::command_event_json(m.payload().unwrap()).unwrap())
        .collect();
    assert_eq!(commands.iter().collect::<Vec<_>>(), sim_commands);
    let dead: Vec<String> = new(&topics.dead_letter.name)
        .iter()
        .map(|m| header(m, "twinflow.error.reason").unwrap().to_owned())
        .collect();
    assert_eq!(dead, reasons);

    // Changed rules, the other starts, and the limits, on the same instance.
    let steps = json!([{ "reading": { "battery_pct": 35.0 } }]);
    let (status, sim) = api
        .simulate(
            "truck-1",
            &json!({ "rules": { "LOW_BATTERY": { "threshold": 40.0 } }, "steps": steps }),
        )
        .await;
    assert_eq!(status, 200, "{sim}");
    let raised = (sim["steps"][0]["alerts"].as_array().unwrap().iter())
        .find(|a| a["code"] == "LOW_BATTERY")
        .expect("LOW_BATTERY raised at 35 % with the threshold at 40 %");
    assert_eq!(
        (&raised["state"], &raised["threshold"]),
        (&json!("RAISED"), &json!(40.0))
    );
    assert_eq!(sim["rules"][0]["threshold"], 40.0);

    let (status, sim) = api
        .simulate("truck-9", &json!({ "start": "empty", "steps": steps }))
        .await;
    assert_eq!(status, 200, "{sim}");
    assert_eq!(sim["twin"]["version"], 1);
    let as_of = rfc3339(now - 10 * MINUTE);
    let (status, sim) = api
        .simulate("truck-1", &json!({ "start": as_of, "steps": [] }))
        .await;
    assert_eq!(status, 200, "{sim}");
    assert_eq!(
        sim["start"]["twin"]["version"], 6,
        "the version of 10 minutes ago"
    );

    for (body, expect) in [
        (
            json!({ "steps": steps, "rules": { "NO_SUCH": { "threshold": 1.0 } } }),
            400,
        ),
        (
            json!({ "steps": steps, "rules": { "TEMP_BREACH": { "clear_threshold": 9.0 } } }),
            400,
        ),
        (
            json!({ "steps": steps, "rules": { "TEMP_BREACH": { "horizon": "10m" } } }),
            400,
        ),
        (
            json!({ "steps": steps, "rules": { "ASSET_OFFLINE": { "threshold": 1.0 } } }),
            400,
        ),
        (json!({ "steps": [{ "advance": "soon" }] }), 400),
        (json!({ "steps": [{ "advance": "400d" }] }), 400),
        (
            json!({ "steps": vec![json!({ "advance": "1s" }); 1001] }),
            400,
        ),
        (json!({ "steps": steps, "start": "yesterday" }), 400),
        (json!({ "steps": steps, "extra": 1 }), 400),
    ] {
        let (status, answer) = api.simulate("truck-1", &body).await;
        assert_eq!(status, expect, "{body} -> {answer}");
    }
    assert_eq!(
        api.simulate("nobody", &json!({ "steps": steps })).await.0,
        404
    );
    let (status, _) = api.post("truck-1", vec![b' '; 300 * 1024]).await;
    assert_eq!(status, 413, "a body over 256 KiB");
    // A reading of another asset, or with a property the model does not have, is refused
    // with why, as the pipeline would.
    let (_, sim) = api
        .simulate(
            "truck-1",
            &json!({ "steps": [
                { "reading": { "asset_id": "truck-2", "battery_pct": 50.0 } },
                { "reading": { "batery_pct": 50.0 } },
            ] }),
        )
        .await;
    let reasons: Vec<&Value> = (sim["steps"].as_array().unwrap().iter())
        .map(|s| &s["reason"])
        .collect();
    assert_eq!(
        reasons,
        [&json!("key_mismatch"), &json!("invalid")],
        "{sim:#}"
    );
    assert_eq!(ends(&p), ends_after, "still nothing written");
    p.stop().await;
}

/// Waits until `check` holds for the explanation of `rule` on `id`; returns the whole answer.
async fn until_explained(api: &Api, id: &str, rule: &str, check: impl Fn(&Value) -> bool) -> Value {
    api.until(&format!("/twins/{id}/explain?rule={rule}"), check)
        .await
}

/// An instance on the real-fleet forecast model, started, with its API.
fn started() -> (twinflow::demo::embedded::EmbeddedKafka, TestPipeline, Api) {
    let (kafka, mut p) = on_embedded(common::fleet_forecast_topology());
    p.start();
    let api = Api {
        base: format!("http://{}", p.http.unwrap()),
        client: reqwest::Client::new(),
    };
    (kafka, p, api)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn explain_says_why_an_alert_is_raised_held_by_hysteresis_cleared_or_refused() {
    let (_kafka, mut p, api) = started();
    let now = p.now();
    p.send(
        "truck-2",
        now - 3 * MINUTE,
        &[("temperature_c", 9.0), ("battery_pct", 50.0)],
    )
    .await;
    let raised = until_explained(&api, "truck-2", "TEMP_BREACH", |a| a["version"] == 1).await;
    let rule = &raised["rules"][0];
    assert_eq!(rule["state"], "raised", "{raised:#}");
    assert_eq!(rule["holds"], true);
    assert_eq!(rule["value"], 9.0);
    assert_eq!(rule["rule"]["clear_threshold"], 7.5);
    assert_eq!(rule["last_raised"], rfc3339(now - 3 * MINUTE));
    assert_eq!(rule["alert"]["raised_at"], rfc3339(now - 3 * MINUTE));

    // Below the threshold, above the clear threshold: still raised, and it says why.
    p.send("truck-2", now - 2 * MINUTE, &[("temperature_c", 7.8)])
        .await;
    let held = until_explained(&api, "truck-2", "TEMP_BREACH", |a| a["version"] == 2).await;
    let rule = &held["rules"][0];
    assert_eq!(
        (&rule["state"], &rule["holds"], &rule["holds_clear"]),
        (&json!("raised"), &json!(false), &json!(true)),
        "{held:#}"
    );
    assert!(
        rule["explanation"]
            .as_str()
            .unwrap()
            .contains("no longer > 7.5"),
        "{held:#}"
    );

    p.send("truck-2", now - MINUTE, &[("temperature_c", 7.0)])
        .await;
    let cleared = until_explained(&api, "truck-2", "TEMP_BREACH", |a| a["version"] == 3).await;
    let rule = &cleared["rules"][0];
    assert_eq!(rule["state"], "clear", "{cleared:#}");
    assert_eq!(rule["last_raised"], rfc3339(now - 3 * MINUTE));
    assert_eq!(
        rule["last_cleared"],
        rfc3339(now),
        "the processing time of the clearing version"
    );

    // A forecast with too few readings says what it lacks.
    let forecast = until_explained(&api, "truck-2", "LOW_BATTERY_PREDICTED", |_| true).await;
    let rule = &forecast["rules"][0];
    assert_eq!(rule["guards"]["samples"], 1, "{forecast:#}");
    assert_eq!(
        rule["explanation"],
        "no forecast: 1 of the 5 readings needed in the window"
    );

    // A reading two hours late is refused, and explain says so until a reading applies.
    p.send("truck-2", now - 120 * MINUTE, &[("temperature_c", 20.0)])
        .await;
    let refused = until_explained(&api, "truck-2", "TEMP_BREACH", |a| {
        a["latest_reading_refused"] == true
    })
    .await;
    assert_eq!(refused["last_refused"]["reason"], "late", "{refused:#}");
    assert_eq!(refused["last_refused"]["source_topic"], "telemetry");
    p.send("truck-2", now, &[("temperature_c", 6.0)]).await;
    let applied = until_explained(&api, "truck-2", "TEMP_BREACH", |a| a["version"] == 4).await;
    assert_eq!(applied["latest_reading_refused"], false, "{applied:#}");
    assert_eq!(applied["last_refused"]["reason"], "late");

    let (_, all) = api.get("/twins/truck-2/explain").await;
    let codes: Vec<&Value> = (all["rules"].as_array().unwrap().iter())
        .map(|r| &r["rule"]["code"])
        .collect();
    assert_eq!(codes.len(), 6, "every rule of the model: {codes:?}");
    assert_eq!(api.get("/twins/truck-2/explain?rule=NOPE").await.0, 404);
    assert_eq!(api.get("/twins/nobody/explain").await.0, 404);
    assert_eq!(api.get("/twins/truck-2/explain?rules=x").await.0, 400);
    p.stop().await;
}
