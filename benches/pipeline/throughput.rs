//! Scenario 1 and 3: how fast a preloaded input drains, through the rdkafka passthrough
//! (the limit), through twinflow under each guarantee, and through the Quix Streams peer.
//! Each contender gets a fresh broker with the same input preloaded, and is timed until its
//! committed input positions reach the end of every partition.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use rdkafka::consumer::BaseConsumer;
use tokio::runtime::Runtime;
use twinflow::config::Guarantee;
use twinflow::topology::Topology;

use crate::harness::{
    self, Instance, POLL, broker_with, caught_up, client, committed, cpu_seconds, timeout_for,
};

/// One contender's drain.
pub struct Drain {
    /// Input records per second, from the first moment it could consume until its committed
    /// positions reached the end.
    pub rate: f64,
    /// Seconds from start until it could consume (group join, assignment, set-up).
    pub startup: f64,
    /// Mean time of one commit in ms (twinflow only: under exactly-once the workers wait
    /// through it, under at-least-once they go on).
    pub commit_ms: Option<f64>,
    /// Mean time of each commit phase in ms, as [`PHASES`] lists them (twinflow only).
    pub phases_ms: Vec<f64>,
    /// CPU seconds the contender's process used per million input records, start-up
    /// included (the broker's are nobody's).
    pub cpu_per_million: f64,
}

/// The phases of a commit, as `twinflow_commit_phase_duration_seconds` labels them.
pub const PHASES: [&str; 4] = ["deliveries", "prepare", "transaction", "store"];

/// The input's format: the peer is told, twinflow reads it as its topology says.
#[derive(Clone, Copy, PartialEq)]
pub enum Input {
    Avro,
    Json,
}

/// The passthrough: consume the telemetry topic, produce the same bytes to the changelog.
pub fn passthrough(
    rt: &Runtime,
    topology: &Topology,
    input: &[(Vec<u8>, Vec<u8>)],
    run: usize,
) -> Drain {
    let topic = &topology.topics.telemetry.name;
    let (broker, ends) = broker_with(rt, topology, topic, input);
    let started = Instant::now();
    let cpu = cpu_seconds(None);
    harness::passthrough(
        &broker.bootstrap,
        &format!("bench-passthrough-{run}"),
        topic,
        &topology.topics.changelog.name,
        |positions| harness::reached(positions, topic, &ends),
    );
    Drain {
        rate: input.len() as f64 / started.elapsed().as_secs_f64(),
        startup: 0.0,
        commit_ms: None,
        phases_ms: vec![],
        cpu_per_million: per_million(cpu_seconds(None) - cpu, input.len()),
    }
}

fn per_million(cpu: f64, records: usize) -> f64 {
    cpu * 1e6 / records as f64
}

/// A twinflow instance (fresh store and group) under `guarantee`.
pub fn twinflow(
    rt: &Runtime,
    topology: &Topology,
    input: &[(Vec<u8>, Vec<u8>)],
    format: Input,
    guarantee: Guarantee,
    run: usize,
) -> Drain {
    let topic = &topology.topics.telemetry.name;
    let partitions = topology.topics.telemetry.partitions;
    let (broker, ends) = broker_with(rt, topology, topic, input);
    let store = tempfile::tempdir().expect("a store directory");
    let group = format!("bench-{guarantee:?}-{run}").to_lowercase();
    let mut config = harness::config(&broker.bootstrap, &group, guarantee, store.path());
    if format == Input::Json {
        config.topology = harness::json_topology();
    }
    let started = Instant::now();
    let cpu = cpu_seconds(None);
    let mut instance = Instance::start(rt, &config);
    instance.wait_until(rt, "assignment", timeout_for(0), |m| {
        m.assigned_partitions.get() == i64::from(partitions)
    });
    let assigned = Instant::now();
    instance.wait_until(rt, "the end of the input", timeout_for(input.len()), |m| {
        caught_up(m, &ends)
    });
    let rate = input.len() as f64 / assigned.elapsed().as_secs_f64();
    let cpu = cpu_seconds(None) - cpu;
    let commits = &instance.metrics.commit_seconds;
    let commit_ms = 1000.0 * commits.get_sample_sum() / commits.get_sample_count().max(1) as f64;
    let phases_ms = PHASES
        .iter()
        .map(|phase| {
            let h = instance
                .metrics
                .commit_phase_seconds
                .with_label_values(&[*phase]);
            1000.0 * h.get_sample_sum() / h.get_sample_count().max(1) as f64
        })
        .collect();
    instance.stop(rt);
    Drain {
        rate,
        startup: (assigned - started).as_secs_f64(),
        commit_ms: Some(commit_ms),
        phases_ms,
        cpu_per_million: per_million(cpu, input.len()),
    }
}

/// The Quix Streams application under `benches/quix/`, or `None` when its environment is not
/// set up (`bash benches/quix/setup`). Quix Streams 3.28.1 now and then stops at start with
/// a `KeyError` naming its own changelog topic (its recovery hands a changelog record to
/// the processing loop); a run that stops early is started once more, on a fresh broker,
/// and says so.
pub fn quix(
    rt: &Runtime,
    topology: &Topology,
    input: &[(Vec<u8>, Vec<u8>)],
    format: Input,
    run: usize,
) -> Option<Drain> {
    let python = quix_python()?;
    match quix_once(&python, rt, topology, input, format, run) {
        Ok(drain) => Some(drain),
        Err(status) => {
            eprintln!("the Quix Streams application stopped early ({status}); running it again");
            let again = quix_once(&python, rt, topology, input, format, run);
            Some(again.unwrap_or_else(|status| {
                panic!("the Quix Streams application stopped early twice: {status}")
            }))
        }
    }
}

/// One drain by the Quix Streams application; the exit status if it stopped early.
fn quix_once(
    python: &Path,
    rt: &Runtime,
    topology: &Topology,
    input: &[(Vec<u8>, Vec<u8>)],
    format: Input,
    run: usize,
) -> Result<Drain, std::process::ExitStatus> {
    let topic = &topology.topics.telemetry.name;
    let partitions = topology.topics.telemetry.partitions;
    let (broker, ends) = broker_with(rt, topology, topic, input);
    let state = tempfile::tempdir().expect("a state directory");
    let group = format!("bench-quix-{run}");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let started = Instant::now();
    let mut peer = Command::new(python)
        .arg(root.join("benches/quix/twins.py"))
        .current_dir(root)
        .env("TWINS_BOOTSTRAP", &broker.bootstrap)
        .env("TWINS_GROUP", &group)
        .env(
            "TWINS_TOPOLOGY",
            crate::common::threshold_vehicle_topology().model,
        )
        .env("TWINS_STATE_DIR", state.path())
        .env("TWINS_GUARANTEE", "at-least-once")
        .env(
            "TWINS_FORMAT",
            if format == Input::Json {
                "json"
            } else {
                "avro"
            },
        )
        .env(
            "TWINS_COMMIT_INTERVAL",
            harness::COMMIT_INTERVAL.as_secs_f64().to_string(),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the Quix Streams application starts");
    let watcher: BaseConsumer = client(&broker.bootstrap)
        .set("group.id", &group)
        .create()
        .expect("a consumer to read the group's offsets");
    let deadline = started + timeout_for(input.len() * 20);
    let mut first = None;
    loop {
        let positions = committed(&watcher, topic, partitions);
        if first.is_none() && positions.iter().any(|o| *o >= 0) {
            first = Some(started.elapsed());
        }
        if positions.iter().zip(&ends).all(|(o, end)| o >= end) {
            break;
        }
        if let Some(status) = peer.try_wait().expect("the peer's status") {
            return Err(status);
        }
        assert!(
            Instant::now() < deadline,
            "the Quix Streams application did not finish: {positions:?} of {ends:?}"
        );
        std::thread::sleep(POLL * 10);
    }
    let elapsed = started.elapsed();
    let cpu = cpu_seconds(Some(peer.id()));
    let _ = peer.kill();
    let _ = peer.wait();
    Ok(Drain {
        rate: input.len() as f64 / elapsed.as_secs_f64(),
        startup: first.map_or(f64::NAN, |d| d.as_secs_f64()),
        commit_ms: None,
        phases_ms: vec![],
        cpu_per_million: per_million(cpu, input.len()),
    })
}

/// The Python of the peer's environment, if set up.
fn quix_python() -> Option<PathBuf> {
    if std::env::var("TWINFLOW_BENCH_QUIX").is_ok_and(|v| v == "0") {
        return None;
    }
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/quix/.venv/bin/python");
    python.exists().then_some(python)
}
