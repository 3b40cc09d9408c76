//! Whole-instance figures against a real Kafka-protocol broker: a noida-db process on
//! loopback, started the way the broker tests start it, a fresh one with a fresh data
//! directory for every measurement. Every figure comes with a baseline measured in the same
//! run, since absolute numbers on a small shared machine say little. Figures are medians
//! over the runs; each ratio is the median of the per-run ratios.
//!
//! 1. **Throughput** (`throughput.rs`): the same simulated readings preloaded into the
//!    telemetry topic drain through the rdkafka passthrough (the baseline: consume, produce
//!    the same bytes, commit every 100 ms after the output is acknowledged), through twinflow
//!    at-least-once and exactly-once (100 ms commits), and through the Quix Streams peer in
//!    `benches/quix/` when its environment is set up (`bash benches/quix/setup`). **On JSON
//!    input** (scenario `json`): the same readings as JSON objects through the passthrough,
//!    twinflow at-least-once (its "json" telemetry format) and the peer reading and writing
//!    JSON, its fastest path. Beside records/s, each contender's CPU seconds per million
//!    readings, start-up included: this process's for the passthrough and twinflow, the
//!    peer's Python process's for it.
//! 2. **Restore** (`restore.rs`): an empty store restores a changelog of one record per twin,
//!    next to a plain consumer reading the same topic; then a restart on the intact store,
//!    timed until `GET /readyz` answers 200; and the twin API's latency on the restored fleet.
//! 3. **Latency** (`latency.rs`): produce → changelog-visible at 25 % of the drain rate
//!    measured above, with an open-loop paced producer, next to the passthrough at the same
//!    offered rate.
//!
//! `cargo bench --bench pipeline`: the full run (2M readings of 100k vehicles, 1M twins to
//! restore, 20 s of latency per contender, three runs). Sizes come from the environment:
//! `TWINFLOW_BENCH_RECORDS`, `TWINFLOW_BENCH_ASSETS`, `TWINFLOW_BENCH_TWINS`,
//! `TWINFLOW_BENCH_LATENCY_SECS`, `TWINFLOW_BENCH_RUNS`; `TWINFLOW_BENCH_QUIX=0` leaves the
//! peer out; `TWINFLOW_BENCH_SCENARIOS` picks some of `throughput,json,restore,latency` (latency
//! without throughput offers `TWINFLOW_BENCH_LATENCY_RATE` records/s, default 40000);
//! `TWINFLOW_BENCH_VIEW=off` runs twinflow as a processing-only instance (no fleet view).

#[path = "../../tests/common/mod.rs"]
mod common;
mod harness;
mod latency;
mod restore;
#[path = "../support/mod.rs"]
mod support;
mod throughput;

use std::sync::Arc;

use common::threshold_vehicle_topology;
use latency::Contender;
use support::{env, median};
use throughput::{Drain, Input};
use tokio::runtime::Runtime;
use twinflow::codec::Format;
use twinflow::config::Guarantee;
use twinflow::demo::sim::{Fleet, FleetConfig};
use twinflow::topology::Topology;
use twinflow::twin::Reading;

use crate::harness::{COMMIT_INTERVAL, START_MS, noida_version};

fn main() {
    let records = env("TWINFLOW_BENCH_RECORDS", 2_000_000);
    let assets = env("TWINFLOW_BENCH_ASSETS", 100_000);
    let twins = env("TWINFLOW_BENCH_TWINS", 1_000_000);
    let latency_secs = env("TWINFLOW_BENCH_LATENCY_SECS", 20) as f64;
    let runs = env("TWINFLOW_BENCH_RUNS", 3).max(1);
    let scenarios = std::env::var("TWINFLOW_BENCH_SCENARIOS")
        .unwrap_or_else(|_| "throughput,json,restore,latency".to_owned());
    let scenario = |name: &str| scenarios.split(',').any(|s| s.trim() == name);
    // Without the forecast rule: the Quix Streams peer runs the threshold rules only.
    let topology = Arc::new(Topology::load(&threshold_vehicle_topology()).expect("topology"));
    let rt = Runtime::new().expect("a Tokio runtime");
    let input = Fleet::new(
        FleetConfig {
            assets,
            seed: 1,
            malformed: 0.0,
            start_ms: START_MS,
            interval_ms: 1000,
        },
        &topology,
    )
    .expect("fleet")
    .take(records);
    let input_bytes: usize = input.iter().map(|(_, v)| v.len()).sum();

    let (_, librdkafka) = rdkafka::util::get_rdkafka_version();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "pipeline benchmark: twinflow (App, in this process) against a noida-db {} broker process on loopback, \
         a fresh broker per measurement; librdkafka {librdkafka}, {cores} cores shared by all, median of {runs} run(s)",
        noida_version()
    );

    // Throughput, on Avro input and on the same readings as JSON objects.
    let json_input: Vec<(Vec<u8>, Vec<u8>)> = if scenario("json") {
        input
            .iter()
            .map(|(k, v)| (k.clone(), as_json(&topology, v)))
            .collect()
    } else {
        vec![]
    };
    let mut avro = Drains::default();
    let mut json = Drains::default();
    for run in 0..runs {
        if scenario("throughput") {
            avro.measure(&rt, &topology, &input, Input::Avro, true, run);
        }
        if scenario("json") {
            json.measure(&rt, &topology, &json_input, Input::Json, false, run);
        }
    }
    let telemetry = &topology.topics.telemetry;
    if scenario("throughput") {
        println!();
        println!(
            "1. throughput: {records} readings ({} B avg) of {assets} vehicles preloaded in {} ({} partitions); \
         records/s from the moment each could consume until its committed positions reached the end; \
         commits every {} ms; mean commit: from taking the staged work to its store write (exactly-once: processing waits through it); \
         CPU: seconds of the contender's process per million readings, start-up included",
            input_bytes / records.max(1),
            telemetry.name,
            telemetry.partitions,
            COMMIT_INTERVAL.as_millis()
        );
        avro.print("≥ 0.70", "≥ 0.60");
    }
    if scenario("json") {
        let json_bytes: usize = json_input.iter().map(|(_, v)| v.len()).sum();
        println!();
        println!(
            "1b. throughput on JSON input: the same readings as JSON objects ({} B avg), twinflow's \"json\" telemetry format \
         (it writes Avro); the peer reads and writes JSON with Quix Streams' own serializers",
            json_bytes / records.max(1)
        );
        json.print("", "");
    }
    // Restore.
    if scenario("restore") {
        let restores: Vec<_> = (0..runs)
            .map(|run| restore::measure(&rt, &topology, twins, run))
            .collect();
        restore::print(&restores, &topology, twins);
    }
    if !scenario("latency") {
        return;
    }

    // Latency, at a quarter of the drain rates measured above (or given, without them).
    let given = env("TWINFLOW_BENCH_LATENCY_RATE", 40_000) as f64;
    let quarter = if avro.alo.is_empty() {
        given
    } else {
        rate(&avro.alo) / 4.0
    };
    let quarter_eos = if avro.eos.is_empty() {
        given
    } else {
        rate(&avro.eos) / 4.0
    };
    let (mut lp, mut la, mut le) = (vec![], vec![], vec![]);
    for run in 0..runs {
        let m = |c, r| latency::measure(&rt, &topology, &input, c, r, latency_secs, run);
        lp.push(m(Contender::Passthrough, quarter));
        la.push(m(Contender::Twinflow(Guarantee::AtLeastOnce), quarter));
        le.push(m(Contender::Twinflow(Guarantee::ExactlyOnce), quarter_eos));
    }
    println!();
    println!(
        "6. latency: produce → changelog visible to a read_committed consumer; open-loop producer paced at 25 % of the \
         drain rate above for {latency_secs} s (first 2 s not counted), latency from each record's intended send time"
    );
    println!(
        "| contender                    | offered/s | p50 ms | p99 ms | p99.9 ms | max ms | p99 vs passthrough | target p99 | producer lag |"
    );
    println!(
        "|------------------------------|----------:|-------:|-------:|---------:|-------:|-------------------:|-----------:|-------------:|"
    );
    let row = |name: &str, offered: f64, v: &[latency::Latency], target: &str| {
        let m = |f: fn(&latency::Latency) -> f64| median(v.iter().map(f).collect());
        let ratio = median(v.iter().zip(&lp).map(|(a, b)| a.p99 / b.p99).collect());
        println!(
            "| {name:<28} | {offered:>9.0} | {:>6.1} | {:>6.1} | {:>8.1} | {:>6.1} | {ratio:>18.2} | {target:>10} | {:>9.1} ms |",
            m(|l| l.p50),
            m(|l| l.p99),
            m(|l| l.p999),
            m(|l| l.max),
            m(|l| l.behind)
        );
    };
    row("rdkafka passthrough (baseline)", quarter, &lp, "");
    row("twinflow at-least-once", quarter, &la, "≤ 20");
    row(
        "twinflow exactly-once",
        quarter_eos,
        &le,
        &format!("≤ {}", COMMIT_INTERVAL.as_millis() + 50),
    );
    println!(
        "samples per run: {} / {} / {}",
        lp[0].samples, la[0].samples, le[0].samples
    );
}

fn rate(v: &[Drain]) -> f64 {
    median(v.iter().map(|d| d.rate).collect())
}

/// The JSON object a device would send for the Avro reading `value`.
fn as_json(topology: &Topology, value: &[u8]) -> Vec<u8> {
    let mut reading = Reading::default();
    topology
        .codec
        .decode_reading(Format::Avro, value, &mut reading)
        .expect("the simulated reading decodes");
    serde_json::to_vec(&topology.codec.reading_json(&reading)).expect("JSON")
}

/// The drains of each contender over the runs, on one input.
#[derive(Default)]
struct Drains {
    pass: Vec<Drain>,
    alo: Vec<Drain>,
    eos: Vec<Drain>,
    quix: Vec<Drain>,
}

impl Drains {
    fn measure(
        &mut self,
        rt: &Runtime,
        topology: &Topology,
        input: &[(Vec<u8>, Vec<u8>)],
        format: Input,
        exactly_once: bool,
        run: usize,
    ) {
        self.pass
            .push(throughput::passthrough(rt, topology, input, run));
        let twinflow =
            |guarantee| throughput::twinflow(rt, topology, input, format, guarantee, run);
        self.alo.push(twinflow(Guarantee::AtLeastOnce));
        if exactly_once {
            self.eos.push(twinflow(Guarantee::ExactlyOnce));
        }
        if let Some(q) = throughput::quix(rt, topology, input, format, run) {
            self.quix.push(q);
        }
    }

    /// The table of the drains, with the at-least-once and exactly-once targets.
    fn print(&self, alo_target: &str, eos_target: &str) {
        println!(
            "| contender                                   | records/s  | vs passthrough | target | start-up | mean commit | CPU s / 1M |"
        );
        println!(
            "|---------------------------------------------|-----------:|---------------:|-------:|---------:|------------:|-----------:|"
        );
        let m = |v: &[Drain], f: fn(&Drain) -> f64| median(v.iter().map(f).collect());
        let commit = |v: &[Drain]| median(v.iter().filter_map(|d| d.commit_ms).collect());
        let vs = |v: &[Drain], base: &[Drain]| {
            median(v.iter().zip(base).map(|(a, b)| a.rate / b.rate).collect())
        };
        let pass = &self.pass;
        println!(
            "| rdkafka passthrough (baseline)              | {:>10.0} |           1.00 |        |        – |           – | {:>10.2} |",
            rate(pass),
            m(pass, |d| d.cpu_per_million)
        );
        let twinflow = |name: &str, v: &[Drain], target: &str| {
            println!(
                "| {name:<43} | {:>10.0} | {:>14.2} | {target:>6} | {:>6.2} s | {:>8.1} ms | {:>10.2} |",
                rate(v),
                vs(v, pass),
                m(v, |d| d.startup),
                commit(v),
                m(v, |d| d.cpu_per_million)
            );
        };
        twinflow("twinflow at-least-once", &self.alo, alo_target);
        if !self.eos.is_empty() {
            twinflow("twinflow exactly-once", &self.eos, eos_target);
        }
        for (name, v) in [("at-least-once", &self.alo), ("exactly-once", &self.eos)] {
            if v.is_empty() {
                continue;
            }
            let phases: Vec<String> = throughput::PHASES
                .iter()
                .enumerate()
                .map(|(i, phase)| {
                    format!(
                        "{phase} {:.1} ms",
                        median(v.iter().map(|d| d.phases_ms[i]).collect())
                    )
                })
                .collect();
            println!(
                "twinflow {name}, mean commit by phase: {}",
                phases.join(", ")
            );
        }
        if self.quix.is_empty() {
            println!(
                "| Quix Streams peer: left out (TWINFLOW_BENCH_QUIX=0) or not set up (bash benches/quix/setup) | | | | | | |"
            );
            return;
        }
        println!(
            "| Quix Streams 3.28.1 at-least-once (peer)    | {:>10.0} | {:>14.2} |        | {:>6.2} s |           – | {:>10.2} |",
            rate(&self.quix),
            vs(&self.quix, pass),
            m(&self.quix, |d| d.startup),
            m(&self.quix, |d| d.cpu_per_million)
        );
        let per_cpu = median(
            self.alo
                .iter()
                .zip(&self.quix)
                .map(|(t, q)| q.cpu_per_million / t.cpu_per_million)
                .collect(),
        );
        println!(
            "twinflow at-least-once / Quix Streams: {:.1} by records/s, {per_cpu:.1} per CPU second (target ≥ 20)",
            vs(&self.alo, &self.quix)
        );
    }
}
