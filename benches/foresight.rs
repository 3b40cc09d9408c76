//! Foresight figures: `twinflow backtest` against a plain consumer of the same telemetry
//! topic, and `POST /twins/{id}/simulate` with 100 readings against `GET /twins/{id}`, each
//! pair measured in the same run.
//!
//! Backtest: the simulated fleet's readings (stamped a round a second) fill the telemetry
//! topic of a fresh embedded mock cluster (16 partitions: it keeps about 5 MiB a
//! partition); then, alternating, a plain consumer reads the whole topic (the broker and
//! librdkafka alone) and the backtest replays it through the shipped vehicle model and a
//! candidate (LOW_BATTERY at 20 %), in this process. Reported: readings/s of each and their
//! ratio (median of the runs). Target: at least 200,000 readings/s.
//!
//! Simulate: one instance on the embedded cluster with a twin of 30 versions; requests one
//! after the other, a `GET /twins/{id}` then a simulation of 100 readings (a draining battery,
//! a minute apart, on the shipped rules and with LOW_BATTERY moved to 20 %). Reported: p50,
//! p99 and p99.9 of each.
//!
//! `cargo bench --bench foresight`; sizes from `TWINFLOW_BENCH_RECORDS` (1,000,000),
//! `TWINFLOW_BENCH_ASSETS` (10,000), `TWINFLOW_BENCH_REQUESTS` (2,000) and
//! `TWINFLOW_BENCH_RUNS` (3).

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use support::{env, median};
use twinflow::config::Config;
use twinflow::demo::embedded::EmbeddedKafka;
use twinflow::demo::sim::{Fleet, FleetConfig};
use twinflow::topology::Topology;

const START_MS: i64 = 1_790_000_000_000;

/// Writes `records` to `topic`, record `i` stamped a round (`assets` records) a second.
fn fill(bootstrap: &str, topic: &str, records: &[(Vec<u8>, Vec<u8>)], assets: usize) {
    let producer: ThreadedProducer<DefaultProducerContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "5")
        .set("compression.type", "lz4")
        .create()
        .expect("producer");
    for (i, (key, value)) in records.iter().enumerate() {
        let at = START_MS + (i / assets) as i64 * 1000;
        let mut record = BaseRecord::to(topic).key(key).payload(value).timestamp(at);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(_), back)) => {
                    record = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => panic!("producing: {e}"),
            }
        }
    }
    producer.flush(Duration::from_secs(120)).expect("flushed");
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)]
}

fn main() {
    let count = env("TWINFLOW_BENCH_RECORDS", 1_000_000);
    let assets = env("TWINFLOW_BENCH_ASSETS", 10_000);
    let requests = env("TWINFLOW_BENCH_REQUESTS", 2_000);
    let runs = env("TWINFLOW_BENCH_RUNS", 3).max(1);
    let mut live = Topology::load(&common::vehicle_topology()).expect("topology");
    live.topics.telemetry.partitions = env("TWINFLOW_BENCH_PARTITIONS", 16) as i32;
    let mut candidate = live.clone();
    for rule in &mut candidate.rules.rules {
        if rule.code == "LOW_BATTERY" {
            rule.threshold = 20.0;
        }
    }
    let fleet = FleetConfig {
        assets,
        seed: 5,
        malformed: 0.0,
        start_ms: START_MS,
        interval_ms: 1000,
    };
    let records = Fleet::new(fleet, &live).expect("fleet").take(count);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let topic = live.topics.telemetry.name.clone();
    println!(
        "foresight benchmark: backtest of {count} readings of {assets} vehicles in {topic} ({} partitions) \
         on the embedded mock cluster, median of {runs} run(s); simulate, {requests} requests",
        live.topics.telemetry.partitions
    );
    let (mut plain, mut backtested, mut ratios) = (vec![], vec![], vec![]);
    for run in 0..runs {
        let broker = EmbeddedKafka::start(1).expect("the embedded cluster");
        let bootstrap = broker.bootstrap_servers();
        broker
            .create_topic(&topic, live.topics.telemetry.partitions)
            .expect("the telemetry topic");
        fill(&bootstrap, &topic, &records, assets);
        let config: Config = toml::from_str(&format!(
            "[kafka]\nbootstrap_servers = \"{bootstrap}\"\n[kafka.consumer]\n\"fetch.wait.max.ms\" = \"10\"\n\
             [topology]\ntopics = \"{}\"\nmodel = \"{}\"\n[store]\npath = \"unused\"\n",
            common::vehicle_topology().topics.display(),
            common::vehicle_topology().model.display(),
        ))
        .expect("config");
        let clients = twinflow::kafka::Clients::new(&config);
        let p = common::consume_all(&bootstrap, &topic, records.len());
        let mut progress = |_: u64, _: u64| {};
        let mut b = twinflow::backtest::Backtest {
            live: &live,
            candidate: &candidate,
            clients: &clients,
            registry: None,
            from: START_MS,
            to: i64::MAX,
            flap_within: twinflow::backtest::DEFAULT_FLAP_WITHIN,
            progress: &mut progress,
        };
        let report = twinflow::backtest::backtest(&mut b, rt.handle()).expect("backtest");
        assert_eq!(report.readings as usize, records.len(), "read everything");
        let r = report.readings as f64 / report.seconds;
        eprintln!(
            "run {}: plain consumer {p:.0} records/s, backtest {r:.0} readings/s, ratio {:.2}; {} assets differ",
            run + 1,
            r / p,
            report.differing_assets.len()
        );
        plain.push(p);
        backtested.push(r);
        ratios.push(r / p);
    }
    println!("| figure | measured |");
    println!("|---|---:|");
    println!(
        "| plain consumer of the telemetry topic, records/s | {:.0} |",
        median(plain)
    );
    println!(
        "| backtest, live and candidate model, readings/s (target ≥ 200000) | {:.0} |",
        median(backtested)
    );
    println!(
        "| backtest / plain consumer (median of runs) | {:.2} |",
        median(ratios)
    );

    let (get, simulate) = rt.block_on(simulations(requests));
    let row = |name: &str, mut ms: Vec<f64>| {
        ms.sort_by(f64::total_cmp);
        println!(
            "| {name} | {:.2} | {:.2} | {:.2} |",
            percentile(&ms, 0.5),
            percentile(&ms, 0.99),
            percentile(&ms, 0.999)
        );
    };
    println!();
    println!("| request, one at a time | p50 ms | p99 ms | p99.9 ms |");
    println!("|---|---:|---:|---:|");
    row("GET /twins/{id} (baseline)", get);
    row("POST /twins/{id}/simulate, 100 readings", simulate);
}

/// Latencies (ms) of `GET /twins/{id}` and of a 100-reading simulation, alternating.
async fn simulations(requests: usize) -> (Vec<f64>, Vec<f64>) {
    let (_kafka, mut p) = common::on_embedded(common::vehicle_topology());
    p.start();
    let now = p.now();
    for m in 0..30_i64 {
        let values = [("speed_kmh", 60.0), ("battery_pct", 80.0 - m as f64)];
        p.send("truck-1", now - (30 - m) * 60_000, &values).await;
    }
    let base = format!("http://{}", p.http.expect("started"));
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let twin: serde_json::Value = client
            .get(format!("{base}/twins/truck-1"))
            .send()
            .await
            .expect("GET")
            .json()
            .await
            .unwrap_or_default();
        if twin["version"] == 30 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the twin never reached version 30"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let steps: Vec<serde_json::Value> = (0..100)
        .map(|m| {
            let mut reading = serde_json::json!({ "battery_pct": 50.0 - 0.4 * m as f64 });
            reading["event_time"] = (now + m * 60_000).into();
            serde_json::json!({ "reading": reading })
        })
        .collect();
    let body = serde_json::to_vec(&serde_json::json!({
        "at": now + 100 * 60_000,
        "rules": { "LOW_BATTERY": { "threshold": 20.0 } },
        "steps": steps,
    }))
    .expect("JSON");
    let (mut get, mut simulate) = (Vec::new(), Vec::new());
    for _ in 0..requests {
        let t = Instant::now();
        let r = client
            .get(format!("{base}/twins/truck-1"))
            .send()
            .await
            .expect("GET");
        r.bytes().await.expect("body");
        get.push(t.elapsed().as_secs_f64() * 1000.0);
        let t = Instant::now();
        let r = client
            .post(format!("{base}/twins/truck-1/simulate"))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .expect("POST");
        assert_eq!(r.status(), 200);
        r.bytes().await.expect("body");
        simulate.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    p.stop().await;
    (get, simulate)
}
