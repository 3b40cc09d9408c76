//! Failover: what a lost instance costs. Three `twinflow run` processes share a consumer
//! group over 12 partitions on the embedded cluster (the mock cluster: it expires a killed
//! member's session, which noida-db never does). When every twin is in place, readings
//! arrive at a steady rate; once the group has committed positions under that load, the
//! instance with the most partitions is killed with SIGKILL and the two others take its
//! partitions over. Each figure comes from the survivors' logs and a reader of the
//! changelog that notes when each record arrives:
//!
//! - **detection**: the kill → the survivors' assignment of the moved partitions (the
//!   session timeout's share; static membership does not shorten it). The embedded cluster
//!   adds to it: it looks for expired sessions once a second, and after a member expires it
//!   waits the session timeout less 1 s for the others to rejoin before it assigns (a Kafka
//!   broker assigns as soon as every remaining member has rejoined);
//! - **restore**: the assignment → the moved partition's state in place (its worker's
//!   restore finished: the view's twins promoted, the changelog after them read);
//! - **takeover**: the assignment → the first changelog record of the moved partition,
//!   its new owner's first output on the broker;
//! - **total**: the kill → the first output of the last moved partition.
//!
//! Two kinds of instance, on the same input in the same run: warm ones (the default: their
//! fleet view has read the changelog, and a takeover promotes the view's twins), and
//! processing-only ones (`[view] enabled = false`: a takeover restores from the
//! changelog), the baseline.
//!
//! `cargo bench --bench failover`: 100k twins, 3000 readings/s, a 3 s session timeout,
//! three runs. Sizes come from the environment: `TWINFLOW_BENCH_FAILOVER_TWINS`,
//! `TWINFLOW_BENCH_FAILOVER_RATE`, `TWINFLOW_BENCH_SESSION_MS`, `TWINFLOW_BENCH_RUNS`. The
//! embedded cluster keeps about 5 MiB of each partition and drops older records, so it
//! cannot hold the changelog of a million twins; `cargo bench --bench core` measures the
//! promotion of a million.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use common::instance::{
    Instance, Settings, caught_up, committed_offsets, feed, log_micros, micros,
};
use common::untimed_vehicle_topology;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use support::{env, median};
use twinflow::config::TopologyConfig;
use twinflow::demo::embedded::EmbeddedKafka;
use twinflow::demo::sim::{Fleet, FleetConfig};
use twinflow::topology::Topology;

const PARTITIONS: i32 = 12;
const INSTANCES: [&str; 3] = ["a", "b", "c"];
/// How long the readings under load go on: past the kill, the detection and the takeover.
const LOAD_SECS: usize = 15;

fn main() {
    let twins = env("TWINFLOW_BENCH_FAILOVER_TWINS", 100_000);
    let rate = env("TWINFLOW_BENCH_FAILOVER_RATE", 3_000);
    let session_ms = env("TWINFLOW_BENCH_SESSION_MS", 3_000);
    let runs = env("TWINFLOW_BENCH_RUNS", 3).max(1);

    // The shipped topics, every partitioned one with 12 partitions.
    let dir = tempfile::tempdir().expect("a directory");
    let shipped = untimed_vehicle_topology();
    let topics = dir.path().join("topics.toml");
    let text = std::fs::read_to_string(&shipped.topics).expect("the topics file");
    std::fs::write(
        &topics,
        text.replace("partitions = 4", &format!("partitions = {PARTITIONS}")),
    )
    .expect("the topics file is written");
    let topology = TopologyConfig {
        topics,
        model: shipped.model,
    };
    let loaded = Topology::load(&topology).expect("the topology loads");
    let fleet = FleetConfig {
        assets: twins,
        seed: 7,
        malformed: 0.0,
        start_ms: 1_790_000_000_000,
        interval_ms: 1000,
    };
    let input = Fleet::new(fleet, &loaded)
        .expect("fleet")
        .take(twins + rate * LOAD_SECS);
    let (preload, load) = input.split_at(twins);

    println!(
        "failover benchmark: 3 `twinflow run` processes in one group, {PARTITIONS} partitions, {twins} twins, \
         on the embedded cluster; SIGKILL of the instance with the most partitions under about {rate} readings/s; \
         session.timeout.ms {session_ms}; at-least-once; median of {runs} run(s)"
    );
    let mut warm = vec![];
    let mut cold = vec![];
    for _ in 0..runs {
        let scene = Scene {
            topology: &topology,
            topics: &loaded,
            preload,
            load,
            rate,
            session_ms,
        };
        cold.push(scene.measure(false));
        warm.push(scene.measure(true));
    }
    println!(
        "| instances                                    | detection | restore (max) | takeover (max) | total   | twins promoted | changelog records read |"
    );
    println!(
        "|----------------------------------------------|----------:|--------------:|---------------:|--------:|---------------:|-----------------------:|"
    );
    let row = |name: &str, v: &[Failover]| {
        let m = |f: fn(&Failover) -> f64| median(v.iter().map(f).collect());
        println!(
            "| {name:<44} | {:>7.2} s | {:>11.3} s | {:>12.3} s | {:>5.2} s | {:>14.0} | {:>22.0} |",
            m(|f| f.detection),
            m(|f| f.restore),
            m(|f| f.takeover),
            m(|f| f.total),
            m(|f| f.promoted),
            m(|f| f.records)
        );
    };
    row("processing-only: restore from the changelog", &cold);
    row("warm: promotion from the fleet view", &warm);
    let ratio = median(
        warm.iter()
            .zip(&cold)
            .map(|(w, c)| w.takeover / c.takeover)
            .collect(),
    );
    println!(
        "takeover, warm / processing-only: {ratio:.2}; targets: takeover ≤ 1 s after the assignment, \
         total ≤ the session timeout + 2 s = {:.1} s; moved partitions per run: {:?}",
        session_ms as f64 / 1000.0 + 2.0,
        warm.iter().map(|f| f.moved).collect::<Vec<_>>()
    );
}

/// One failover's figures, in seconds.
struct Failover {
    moved: usize,
    detection: f64,
    restore: f64,
    takeover: f64,
    total: f64,
    /// Twins the survivors' restores took from their views, and changelog records they read.
    promoted: f64,
    records: f64,
}

struct Scene<'a> {
    topology: &'a TopologyConfig,
    topics: &'a Topology,
    preload: &'a [(Vec<u8>, Vec<u8>)],
    load: &'a [(Vec<u8>, Vec<u8>)],
    rate: usize,
    session_ms: usize,
}

impl Scene<'_> {
    /// A fresh cluster and three fresh instances, warm (`view`) or processing-only; kills one
    /// under load and times the takeover of its partitions.
    fn measure(&self, view: bool) -> Failover {
        let kafka = EmbeddedKafka::start(1).expect("the embedded cluster");
        for spec in self.topics.topics.all() {
            kafka
                .create_topic(&spec.name, spec.partitions)
                .expect("a topic");
        }
        let bootstrap = kafka.bootstrap_servers();
        let mut client = ClientConfig::new();
        client.set("bootstrap.servers", &bootstrap);
        let telemetry = &self.topics.topics.telemetry.name;
        let changelog = &self.topics.topics.changelog.name;
        feed(
            &client,
            telemetry,
            self.preload,
            self.preload.len(),
            Duration::ZERO,
        )
        .join()
        .expect("the preload is sent");

        let dir = tempfile::tempdir().expect("a directory");
        let (session, heartbeat) = (
            self.session_ms.to_string(),
            (self.session_ms / 6).to_string(),
        );
        let topics = self.topology.topics.display().to_string();
        let env = [
            ("TWINFLOW_TOPOLOGY__TOPICS", topics.as_str()),
            (
                "TWINFLOW_VIEW__ENABLED",
                if view { "true" } else { "false" },
            ),
        ];
        let settings = Settings {
            bootstrap: &bootstrap,
            group: "failover",
            guarantee: "at_least_once",
            librdkafka: &[],
            consumer: &[
                ("fetch.wait.max.ms", "10"),
                ("session.timeout.ms", &session),
                ("heartbeat.interval.ms", &heartbeat),
            ],
            processing: &[],
            env: &env,
        };
        let mut instances: Vec<Instance> = INSTANCES
            .iter()
            .map(|name| Instance::spawn(dir.path(), name, &settings))
            .collect();
        wait(
            "the instances divide the partitions and apply every twin",
            || {
                let assigned: Vec<f64> = instances
                    .iter()
                    .map(|i| i.metric("twinflow_assigned_partitions"))
                    .collect();
                assigned.iter().sum::<f64>() == f64::from(PARTITIONS)
                    && assigned.iter().all(|n| *n > 0.0)
                    && caught_up(&client, &instances.iter().collect::<Vec<_>>(), telemetry)
                    && (!view || views_complete(&instances))
            },
        );

        // Under load, once the group has committed positions past the preload.
        let ends = end_offsets(&client, telemetry);
        let outputs = Outputs::read(&bootstrap, changelog);
        let per_tick = (self.rate / 20).max(1);
        let feeder = feed(
            &client,
            telemetry,
            self.load,
            per_tick,
            Duration::from_millis(50),
        );
        wait("the group commits positions under load", || {
            committed_offsets(&client, "failover", telemetry)
                .iter()
                .zip(&ends)
                .all(|(o, end)| o.is_some_and(|o| o > *end))
        });
        let victim = (0..instances.len())
            .max_by_key(|i| instances[*i].metric("twinflow_assigned_partitions") as i64)
            .expect("three instances");
        let moving = instances[victim].metric("twinflow_assigned_partitions") as usize;
        let before: f64 = restored(&instances, victim);
        let promoted_before: f64 = promoted(&instances, victim);
        let mut dead = instances.remove(victim);
        dead.child.kill().expect("the instance is killed");
        let killed = micros(SystemTime::now());
        dead.child.wait().expect("the killed instance is reaped");

        // The moved partitions: those the survivors were assigned after the kill.
        let mut moved = BTreeMap::new();
        wait(
            "the survivors take the moved partitions over and write",
            || {
                moved = takeovers(&instances, telemetry, killed);
                moved.len() == moving
                    && moved
                        .iter()
                        .all(|(p, t)| outputs.first_after(*p, t.assigned).is_some())
            },
        );
        let firsts: Vec<i64> = moved
            .iter()
            .map(|(p, t)| outputs.first_after(*p, t.assigned).expect("an output"))
            .collect();
        let seconds = |micros: i64| micros as f64 / 1e6;
        let failover = Failover {
            moved: moving,
            detection: seconds(moved.values().map(|t| t.assigned).min().expect("moved") - killed),
            restore: seconds(
                moved
                    .values()
                    .map(|t| t.ready - t.assigned)
                    .max()
                    .expect("moved"),
            ),
            takeover: seconds(
                moved
                    .values()
                    .zip(&firsts)
                    .map(|(t, first)| first - t.assigned)
                    .max()
                    .expect("moved"),
            ),
            total: seconds(firsts.iter().max().expect("moved") - killed),
            promoted: promoted(&instances, usize::MAX) - promoted_before,
            records: restored(&instances, usize::MAX) - before,
        };
        feeder.join().expect("the load is sent");
        outputs.stop();
        drop(instances);
        failover
    }
}

/// When a survivor was assigned a moved partition, and when its state was in place.
struct Takeover {
    assigned: i64,
    ready: i64,
}

/// The log lines of a partition's start, the last of which puts its state in place: the
/// worker starts and restores (a promotion from the view, then the changelog after it; a
/// restore with nothing to read logs nothing).
const STATE_LINES: [&str; 3] = [
    "Partition worker started.",
    "Promoted the fleet view's twins of the partition.",
    "Restore finished.",
];

/// The partitions of `topic` the instances were assigned after `since` (microseconds),
/// with when, from their logs; a partition whose worker has not started yet is left out.
fn takeovers(instances: &[Instance], topic: &str, since: i64) -> BTreeMap<i32, Takeover> {
    let pattern = format!("(\"{topic}\", ");
    let mut moved = BTreeMap::new();
    for instance in instances {
        let log = std::fs::read_to_string(&instance.log).unwrap_or_default();
        let mut assigned = BTreeMap::new();
        for line in log.lines() {
            let Some(stamp) = line.split(' ').next().filter(|s| s.ends_with('Z')) else {
                continue;
            };
            let at = log_micros(stamp);
            if at < since {
                continue;
            }
            if line.contains("Partitions assigned.") {
                for part in line.split(&pattern).skip(1) {
                    let p: i32 = part
                        .split(')')
                        .next()
                        .and_then(|n| n.parse().ok())
                        .expect("a partition number");
                    assigned.entry(p).or_insert(at);
                }
            } else if STATE_LINES.iter().any(|l| line.contains(l)) {
                let p: i32 = line
                    .split("partition=")
                    .nth(1)
                    .and_then(|r| r.split(' ').next()?.parse().ok())
                    .expect("the line names its partition");
                if let Some(assigned) = assigned.get(&p) {
                    let takeover = moved.entry(p).or_insert(Takeover {
                        assigned: *assigned,
                        ready: at,
                    });
                    takeover.ready = takeover.ready.max(at);
                }
            }
        }
    }
    moved
}

/// Whether every instance's fleet view has read the changelog to its end and holds the same
/// twins (the simulated fleet holds a few readings back to send them late, so a few assets of
/// the preload are not twins yet).
fn views_complete(instances: &[Instance]) -> bool {
    let twins: Vec<f64> = instances
        .iter()
        .map(|i| i.metric("twinflow_view_twins"))
        .collect();
    instances
        .iter()
        .all(|i| i.metric("twinflow_view_lag_records") == 0.0)
        && twins[0] > 0.0
        && twins.iter().all(|t| *t == twins[0])
}

/// The sum of a restore counter over the instances but `except`.
fn restored(instances: &[Instance], except: usize) -> f64 {
    sum_except(instances, except, "twinflow_restore_records_total")
}

fn promoted(instances: &[Instance], except: usize) -> f64 {
    sum_except(instances, except, "twinflow_restore_promoted_twins_total")
}

fn sum_except(instances: &[Instance], except: usize, metric: &str) -> f64 {
    instances
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != except)
        .map(|(_, instance)| instance.metric(metric))
        .sum()
}

fn end_offsets(client: &ClientConfig, topic: &str) -> Vec<i64> {
    let consumer: BaseConsumer = client.create().expect("a consumer");
    (0..PARTITIONS)
        .map(|p| {
            consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .expect("watermarks")
                .1
        })
        .collect()
}

/// A reader of every partition of a topic from its end, noting when each record arrives.
struct Outputs {
    arrivals: Arc<Mutex<BTreeMap<i32, Vec<i64>>>>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Outputs {
    fn read(bootstrap: &str, topic: &str) -> Outputs {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", "failover-reader")
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "5")
            .create()
            .expect("a consumer");
        let mut tpl = TopicPartitionList::new();
        for p in 0..PARTITIONS {
            tpl.add_partition_offset(topic, p, Offset::End)
                .expect("a partition");
        }
        consumer.assign(&tpl).expect("assigned");
        let arrivals = Arc::new(Mutex::new(BTreeMap::<i32, Vec<i64>>::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (noted, stopped) = (arrivals.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !stopped.load(Ordering::SeqCst) {
                if let Some(Ok(m)) = consumer.poll(Duration::from_millis(10)) {
                    let at = micros(SystemTime::now());
                    let mut noted = noted.lock().expect("arrivals");
                    noted.entry(m.partition()).or_default().push(at);
                }
            }
        });
        Outputs {
            arrivals,
            stop,
            thread,
        }
    }

    /// When the first record of `partition` arrived at or after `at`.
    fn first_after(&self, partition: i32, at: i64) -> Option<i64> {
        let arrivals = self.arrivals.lock().expect("arrivals");
        arrivals.get(&partition)?.iter().copied().find(|t| *t >= at)
    }

    fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().expect("the reader stops");
    }
}

/// Polls `done` until it holds, for at most five minutes.
fn wait(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(300);
    while !done() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
